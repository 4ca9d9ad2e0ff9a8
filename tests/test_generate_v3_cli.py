"""``easyanimate generate`` / ``info`` with V1, V2 and V3 model folders: defaults, frame rules, CLIP for V3 image-to-
video, LoRAs in the official format, and the refusals (before any weight is read) of what these models lack."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from easyanimate_core.cli import _add_generate_arguments, _generation_inputs, main
from easyanimate_core.video_io import read_metadata, read_video, write_video
from tests.tiny_checkpoint import write_tiny_checkpoint

SIZE = {"V1": (3, 16, 32), "V2": (9, 32, 32), "V3": (8, 32, 32)}  # frames, height, width (the VAEs' rules)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("pixart")
    return {v: write_tiny_checkpoint(base / f"EasyAnimate{v}-tiny", version=v) for v in SIZE}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media") / "start"
    write_video(folder, torch.rand(1, 40, 60, 3, generator=torch.Generator().manual_seed(0)))
    return folder / "00000.png"


def run(root, out, version, *extra):
    frames, height, width = SIZE[version]
    args = ["--frames", str(frames), "--height", str(height), "--width", str(width), "--steps", "2", "--seed", "1"]
    return main(["generate", "--model", str(root), "--prompt", "a dog walks", "--out", str(out), *args, *extra])


def parse(*argv):
    parser = argparse.ArgumentParser()
    _add_generate_arguments(parser)
    return parser.parse_args(["--prompt", "p", *argv])


@pytest.mark.parametrize("version", ["V1", "V2", "V3"])
def test_text_to_video_writes_the_requested_video_with_the_released_settings(roots, tmp_path, version):
    out = tmp_path / "t2v.mp4"
    assert run(roots[version], out, version) == 0
    frames, height, width = SIZE[version]
    assert tuple(read_video(out).shape) == (frames, height, width, 3)
    meta = read_metadata(out)
    expected = {"V1": ("T2V", 6.0, 12.0), "V2": ("T2V", 6.0, 24.0), "V3": ("InP", 7.0, 24.0)}[version]
    assert (meta["version"], meta["sampler"]) == (version, "DPM++")
    assert (meta["variant"], meta["guidance"], meta["fps"]) == expected


def test_v3_image_to_video_runs_with_the_clip_image_embedding(roots, start, tmp_path):
    out = tmp_path / "i2v.mp4"
    assert run(roots["V3"], out, "V3", "--image", str(start)) == 0
    assert read_video(out).shape[0] == 8
    assert read_metadata(out)["variant"] == "InP"


def test_released_defaults_per_version(roots, tmp_path):
    out = str(tmp_path / "x.mp4")
    job = _generation_inputs(parse("--model", str(roots["V1"]), "--out", out))
    assert job["size"] == {"frames": 80, "height": 512, "width": 512} and job["fps"] == 12.0
    assert (job["sampler"].name, job["sampler"].num_steps, job["guidance"]) == ("DPM++", 30, 6.0)
    job = _generation_inputs(parse("--model", str(roots["V3"]), "--out", out))
    assert job["size"] == {"frames": 144, "height": 384, "width": 672} and job["fps"] == 24.0
    assert (job["sampler"].name, job["sampler"].num_steps, job["guidance"]) == ("DPM++", 25, 7.0)


@pytest.mark.parametrize(
    ("version", "flags", "message"),
    [
        ("V3", ["--frames", "12"], "--frames"),  # the slice VAE takes 1 or 8k
        ("V2", ["--frames", "8"], "--frames"),  # V2's takes 1 or 9k
        ("V3", ["--riflex"], "--riflex"),
        ("V2", ["--cache", "0.1"], "--cache"),
        ("V1", ["--image", "{start}"], "text-to-video model"),
    ],
)
def test_refusals_name_the_flag_before_loading(roots, start, tmp_path, capsys, version, flags, message):
    flags = [f.format(start=start) for f in flags]
    out = tmp_path / "x.mp4"
    assert main(["generate", "--model", str(roots[version]), "--prompt", "p", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_official_format_lora_changes_the_video(roots, tmp_path):
    """A LoRA in the official V1-V3 key format (lora_unet__<module path>) merges through --lora."""
    lora = tmp_path / "lora.safetensors"
    g = torch.Generator().manual_seed(0)
    rank, width = 2, 64
    tensors = {}
    for block in range(4):
        name = f"lora_unet__transformer_blocks_{block}_attn1_to_q"
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, width, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(width, rank, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, lora)
    plain, merged = tmp_path / "plain.mp4", tmp_path / "lora.mp4"
    assert run(roots["V2"], plain, "V2") == 0
    assert run(roots["V2"], merged, "V2", "--lora", str(lora)) == 0
    assert (read_video(plain) - read_video(merged)).abs().max() > 0.01


@pytest.mark.parametrize("version", ["V1", "V2", "V3"])
def test_info_describes_every_part(roots, capsys, version):
    assert main(["info", str(roots[version])]) == 0
    out = capsys.readouterr().out
    assert f"EasyAnimate {version} transformer" in out and f"EasyAnimate {version} vae" in out
    assert "text_encoder: present" in out
    assert ("image_encoder: present" in out) == (version == "V3")
