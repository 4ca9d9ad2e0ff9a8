"""``easyanimate assemble-v1``: a V1 model folder from PixArt-alpha's folder plus the V1 motion-module file, as the
official predict script combined them (motion modules loaded non-strictly on the PixArt transformer)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from easyanimate_core.cli import main
from easyanimate_core.loading import load_transformer
from easyanimate_core.video_io import read_video
from tests.tiny_checkpoint import write_tiny_checkpoint

MOTION = ".attn_temporal."
PIXART_KEYS = ("motion_module_type", "basic_block_type", "motion_module_kwargs", "enable_uvit")


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """A tiny V1 folder, and its release form: a PixArt base folder and the motion-module file (no frame tables)."""
    root = tmp_path_factory.mktemp("v1")
    model = write_tiny_checkpoint(root / "V1-full", version="V1")
    weights = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    base = root / "PixArt-XL-2-tiny"
    (base / "transformer").mkdir(parents=True)
    save_file({k: v for k, v in weights.items() if MOTION not in k}, base / "transformer" / "model.safetensors")
    config = json.loads((model / "transformer" / "config.json").read_text())
    pixart = {k: v for k, v in config.items() if k not in PIXART_KEYS}
    (base / "transformer" / "config.json").write_text(json.dumps(pixart))
    for part in ("vae", "text_encoder", "tokenizer"):
        os.symlink(model / part, base / part)  # the base's own parts (a real base folder holds them itself)
    motion = {k: v for k, v in weights.items() if MOTION in k and not k.endswith("pos_encoder.pe")}
    save_file(motion, root / "easyanimate_v1_mm.safetensors")
    return {"model": model, "base": base, "motion": root / "easyanimate_v1_mm.safetensors", "weights": weights}


def assemble(v1, out, **overrides):
    args = {"--base": v1["base"], "--motion-module": v1["motion"], "--out": out, **overrides}
    return main(["assemble-v1", *[str(x) for kv in args.items() for x in kv]])


def test_the_assembled_folder_is_the_v1_model(v1, tmp_path):
    out = tmp_path / "EasyAnimateV1"
    assert assemble(v1, out) == 0
    transformer = load_transformer(out)
    assert transformer.info.version == "V1" and transformer.config.motion_block_size == 2
    assert transformer.config.motion_heads_even == 8  # the V1 yaml's motion heads (not visible in shapes)
    assert transformer.config.temporal_position_encoding
    state = transformer.state_dict()
    assert set(state) <= set(v1["weights"])
    for key, value in state.items():
        assert torch.equal(value, v1["weights"][key]), key
    # The file is complete, as a released V2 / V3 one: the frame tables the motion-module file omitted were written
    # (the official module's deterministic sinusoids).
    written = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert set(written) == set(v1["weights"])
    for key in (k for k in written if k.endswith("pos_encoder.pe")):
        assert torch.equal(written[key], v1["weights"][key]), key
    for part in ("vae", "text_encoder", "tokenizer"):
        assert (out / part).is_dir()
    video = tmp_path / "v1.mp4"
    argv = ["--frames", "3", "--width", "32", "--height", "16", "--steps", "2"]
    assert main(["generate", "--model", str(out), "--prompt", "a dog", "--out", str(video), *argv]) == 0
    assert read_video(video).shape == (3, 16, 32, 3)


def test_refusals_name_the_flag_and_write_nothing(v1, tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.mkdir()
    assert assemble(v1, existing) == 2
    assert "--out" in capsys.readouterr().err and not any(existing.iterdir())
    bad = tmp_path / "bad_mm.safetensors"
    motion = load_file(v1["motion"])
    key = next(iter(motion))
    save_file({**motion, key: torch.zeros(3, 3)}, bad)
    out = tmp_path / "out"
    assert assemble(v1, out, **{"--motion-module": bad}) == 2
    assert "other shapes than the V1 model" in capsys.readouterr().err
    save_file({**motion, "proj_out.weight": torch.zeros(2, 2)}, bad)
    assert assemble(v1, out, **{"--motion-module": bad}) == 2
    assert "outside the motion modules" in capsys.readouterr().err
    assert assemble(v1, out, **{"--base": v1["model"]}) == 2  # a base that already has motion modules
    assert "already has motion modules" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_loading_the_motion_module_alone_points_to_the_command(v1):
    with pytest.raises(ValueError, match="easyanimate assemble-v1 --base"):
        load_transformer(v1["motion"])
