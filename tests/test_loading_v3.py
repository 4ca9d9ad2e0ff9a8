"""Detecting and loading EasyAnimate V1 / V2 / V3 (PixArt-motion) transformers, and not confusing them with V4-V5.1.

Released layout (Transformer3DModel.from_pretrained_2d at f9eeabe): ``<model>/transformer/config.json`` (PixArt's
config) + ``diffusion_pytorch_model.safetensors``; the motion layout came from the release yaml, not the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from easyanimate_core.cli import main
from easyanimate_core.loading import V3_FAMILY, detect_transformer, inspect_checkpoint, load_transformer
from easyanimate_core.ops import manual_cast
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig
from easyanimate_core.transformer_v3 import V1_XL, V2_XL, V3_XL_INP, EasyAnimateV3Transformer3D
from tests.manifest import manifest
from tests.tiny_checkpoint import write_tiny_checkpoint

# Tiny geometries of the three releases: 2 heads x 16, 16 blocks (so V2 / V3 keep one long skip).
TINY = {"V3": V3_XL_INP, "V2": V2_XL, "V1": V1_XL}
TINY = {
    v: c.replace(num_attention_heads=2, attention_head_dim=16, num_layers=16, caption_channels=24, sample_size=8)
    for v, c in TINY.items()
}
VARIANT = {"V3": "InP", "V2": "T2V", "V1": "T2V"}


def pixart_config(version: str) -> dict:
    """The transformer/config.json of a release: PixArt's settings, no motion-module keys."""
    cfg = TINY[version]
    return {
        "_class_name": "Transformer3DModel",
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "in_channels": 4,  # PixArt's value: the V3 release widened the patch conv in the weights, not here
        "out_channels": 8,
        "num_layers": cfg.num_layers,
        "sample_size": cfg.sample_size,
        "caption_channels": cfg.caption_channels,
        "norm_type": "ada_norm_single",
        "norm_eps": 1e-6,
    }


def random_state_dict(version: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = EasyAnimateV3Transformer3D(TINY[version])
    return {k: torch.randn_like(v) if not k.endswith("pos_encoder.pe") else v for k, v in model.state_dict().items()}


def write_release(root: Path, version: str, seed: int = 0) -> tuple[Path, dict]:
    """``root/transformer/{config.json, diffusion_pytorch_model.safetensors}``; returns root and the weights."""
    folder = root / "transformer"
    folder.mkdir(parents=True)
    sd = random_state_dict(version, seed)
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(pixart_config(version)))
    return root, sd


@pytest.mark.parametrize("version", V3_FAMILY)
def test_released_folder_detects_and_loads_equal_weights(tmp_path, version):
    root, sd = write_release(tmp_path, version)
    model = load_transformer(root)
    assert isinstance(model, EasyAnimateV3Transformer3D)
    assert (model.info.version, model.info.variant) == (version, VARIANT[version])
    assert model.config == TINY[version]
    assert not any(p.is_meta for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert any("config.json says in_channels=4" in n for n in model.info.notes) == (version == "V3")


def test_dtype_and_injected_operations(tmp_path):
    root, sd = write_release(tmp_path, "V2")
    model = load_transformer(root, dtype=torch.bfloat16, operations=manual_cast)
    assert isinstance(model.proj_out, manual_cast.Linear) and isinstance(model.pos_embed.proj, manual_cast.Conv2d)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.proj_out.weight, sd["proj_out.weight"].bfloat16())


def test_config_with_the_yaml_motion_keys_overrides_the_release_table(tmp_path):
    root, _ = write_release(tmp_path, "V2")
    motion = {"num_attention_heads": 2, "num_transformer_block": 1, "block_size": 1}
    motion |= {"attention_block_types": ["Temporal_Self", "Temporal_Self"], "temporal_position_encoding": True}
    config = {**pixart_config("V2"), "motion_module_type": "Vanilla", "enable_uvit": True}
    (root / "transformer" / "config.json").write_text(json.dumps({**config, "motion_module_kwargs": motion}))
    model = load_transformer(root)
    assert (model.info.version, model.config.motion_heads_even, model.config.motion_heads_odd) == ("V2", 2, 2)
    assert not any("release's" in n for n in model.info.notes)


def test_single_file_without_config_or_frame_tables(tmp_path):
    """A bare file: a width of 72-wide heads (the release size) is enough; no stored frame tables, none built."""
    torch.manual_seed(0)
    cfg = V1_XL.replace(num_attention_heads=4, num_layers=2, caption_channels=8, temporal_position_encoding=False)
    sd = EasyAnimateV3Transformer3D(cfg).state_dict()
    save_file(sd, tmp_path / "v1.safetensors")
    model = load_transformer(tmp_path / "v1.safetensors")
    info = model.info
    assert (info.version, info.variant, info.size) == ("V1", "T2V", f"{info.num_params / 1e9:.2f}B")
    assert model.config == cfg
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert any("pos_encoder.pe) stored" in n for n in info.notes)


RELEASES = {"v3_xl_inp": ("V3", "InP", V3_XL_INP), "v2_xl": ("V2", "T2V", V2_XL), "v1_xl": ("V1", "T2V", V1_XL)}


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_manifests_detect_from_shapes_alone(name):
    version, variant, preset = RELEASES[name]
    info = detect_transformer(manifest(name), [Path("diffusion_pytorch_model.safetensors")], {})
    assert (info.version, info.variant, info.size) == (version, variant, "XL")
    assert info.config == preset
    assert 0.6e9 < info.num_params < 2e9  # PixArt-XL's 0.6 B plus the motion modules, frame tables not counted


LATER = {"v4_transformer_guess": "V4", "v5_12b_inp": "V5", "v51_12b_inp": "V5.1", "v51_7b_control": "V5.1"}
LATER |= {"v51_7b_camera": "V5.1"}


@pytest.mark.parametrize("name", list(LATER))
def test_later_release_manifests_are_not_taken_for_v1_v3(name):
    assert detect_transformer(manifest(name), [Path("m.safetensors")], {}).version == LATER[name]


@pytest.mark.parametrize("version", ["V4", "V5", "V5.1"])
def test_tiny_later_checkpoints_still_detect_as_before(tmp_path, version):
    write_tiny_checkpoint(tmp_path, "InP", version=version)
    assert inspect_checkpoint(tmp_path / "transformer", kind="transformer").version == version


def test_mixed_folder_is_refused_naming_both_families(tmp_path):
    root, _ = write_release(tmp_path, "V3")
    v51 = EasyAnimateTransformer3D(
        TransformerConfig(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=1,
            mmdit_layers=1, time_embed_dim=8, text_embed_dim=12, add_norm_text_encoder=True,
        )
    )  # fmt: skip
    stray = {k: v.contiguous() for k, v in v51.state_dict().items()}
    save_file(stray, root / "transformer" / "stray.safetensors")
    with pytest.raises(ValueError, match=r"tensor proj_out\.\w+ is also in .*remove the duplicate file"):
        inspect_checkpoint(root, kind="transformer")
    merged = {**random_state_dict("V3"), **{k: v for k, v in stray.items() if not k.startswith("proj_out.")}}
    save_file(merged, root / "transformer" / "stray.safetensors")
    (root / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"mixes tensors of different EasyAnimate transformers \(V1-V3: .*V5 / V5\.1"):
        inspect_checkpoint(root, kind="transformer")


def test_truncated_file_names_the_file(tmp_path):
    root, _ = write_release(tmp_path, "V1")
    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: truncated"):
        load_transformer(root)


def test_missing_tensor_and_lost_blocks_are_refused(tmp_path):
    sd = random_state_dict("V2")
    del sd["transformer_blocks.3.attn2.to_k.weight"]
    save_file(sd, tmp_path / "a.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(pixart_config("V2")))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*transformer_blocks\.3\.attn2\.to_k\.weight"):
        load_transformer(tmp_path / "a.safetensors")
    sd = {k: v for k, v in random_state_dict("V2").items() if not k.startswith("transformer_blocks.4.")}
    save_file(sd, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"not numbered 0\.\.N-1"):
        load_transformer(tmp_path / "a.safetensors")


def test_motion_module_only_and_base_only_files_say_what_they_are(tmp_path):
    sd = random_state_dict("V1")
    save_file({k: v for k, v in sd.items() if ".attn_temporal." in k}, tmp_path / "mm.safetensors")
    with pytest.raises(ValueError, match="only motion-module weights"):
        load_transformer(tmp_path / "mm.safetensors")
    save_file({k: v for k, v in sd.items() if ".attn_temporal." not in k}, tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match="PixArt-alpha image transformer without motion modules"):
        load_transformer(tmp_path / "base.safetensors")


def test_pickle_only_folder_gives_the_conversion_command(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(pixart_config("V2")))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(ValueError, match=r"(?s)refusing to load a pickle.*V1-V3.*save_file\(.*safetensors'\)"):
        load_transformer(tmp_path)


def test_info_describes_a_v3_model_root(tmp_path, capsys):
    root, _ = write_release(tmp_path, "V3")
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "EasyAnimate V3 transformer" in out and "variant: InP" in out
    assert "not available yet" not in out
    assert "vae: missing" in out and "image_encoder: missing" in out
