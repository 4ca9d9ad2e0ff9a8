"""V4 generation: `easyanimate generate` end to end on a tiny random V4 checkpoint, and the V4 pipeline pieces
(mask through the VAE, CLIP features on the last 40 % of the steps, text masks, size buckets, frame rule)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from easyanimate_core.cli import _add_generate_arguments, _generation_inputs, main
from easyanimate_core.image_encoder import load_image_encoder
from easyanimate_core.loading import load_transformer, load_vae
from easyanimate_core.pipeline import (
    clip_step_inputs,
    encode_sample,
    encoded_mask_inpaint_latents,
    generate,
    image_to_video_inputs,
    size_bucket,
    snap_size,
)
from easyanimate_core.sampling import make_sampler
from easyanimate_core.text_encoders import load_text_encoders
from easyanimate_core.video_io import read_metadata, read_video, write_video
from tests.tiny_checkpoint import write_tiny_checkpoint

FRAMES, HEIGHT, WIDTH = 16, 32, 48  # 16 frames -> 4 slice-VAE latents; 32x48 px -> a 2x3 token grid
COMMON = ["--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", "3", "--seed", "1"]


@pytest.fixture(scope="module")
def v4_root(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("v4") / "EasyAnimateV4-tiny-InP", "InP", version="V4")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    g = torch.Generator().manual_seed(0)
    write_video(folder / "clip.mp4", torch.rand(FRAMES + 3, HEIGHT, WIDTH, 3, generator=g))
    write_video(folder / "start", torch.rand(1, 40, 60, 3, generator=g))  # a folder with one PNG, another size
    return folder


@pytest.fixture(scope="module")
def models(v4_root):
    text = load_text_encoders(v4_root, "v4")
    return {
        "transformer": load_transformer(v4_root),
        "vae": load_vae(v4_root),
        "image_encoder": load_image_encoder(v4_root),
        "prompts": text.encode("a red circle", "blurry"),
    }


def run(model, out, *extra):
    return main(["generate", "--model", str(model), "--prompt", "a red circle", "--out", str(out), *COMMON, *extra])


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("t2v", []),
        ("i2v", ["--image", "{media}/start/00000.png"]),
        ("v2v", ["--video", "{media}/clip.mp4", "--strength", "0.5"]),
    ],
)
def test_cli_writes_a_video_of_the_requested_size(v4_root, media, tmp_path, mode, extra):
    out = tmp_path / f"{mode}.mp4"
    assert run(v4_root, out, *[e.format(media=media) for e in extra]) == 0
    assert tuple(read_video(out).shape) == (FRAMES, HEIGHT, WIDTH, 3)
    meta = read_metadata(out)
    assert (meta["version"], meta["variant"], meta["sampler"], meta["guidance"]) == ("V4", "InP", "Euler", 7.0)
    assert (meta["steps"], meta["fps"]) == (3 if mode != "v2v" else 1, 24.0)


def test_cli_refuses_image_to_video_without_a_safe_image_encoder(v4_root, media, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(v4_root, broken)
    (broken / "image_encoder" / "model.safetensors").rename(broken / "image_encoder" / "pytorch_model.bin")
    out = tmp_path / "x.mp4"
    assert run(broken, out, "--image", f"{media}/start/00000.png") == 2
    assert "refusing pickle weights" in capsys.readouterr().err and not out.exists()
    shutil.rmtree(broken / "image_encoder")
    assert run(broken, out, "--image", f"{media}/start/00000.png") == 2
    assert "image_encoder/config.json missing" in capsys.readouterr().err
    assert run(broken, out) == 0  # text-to-video does not need it


def test_cli_resolution_picks_the_bucket_of_the_input_aspect_ratio(v4_root, media, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    _add_generate_arguments(parser)
    base = ["--model", str(v4_root), "--prompt", "p", "--out", str(tmp_path / "x.mp4")]
    job = _generation_inputs(parser.parse_args([*base, "--resolution", "768"]))
    assert job["size"] == {"frames": 144, "height": 576, "width": 1008} and job["fps"] == 24.0  # 384x672 scaled
    job = _generation_inputs(parser.parse_args([*base, "--resolution", "512", "--image", f"{media}/start/00000.png"]))
    assert (job["size"]["height"], job["size"]["width"]) == (416, 608)  # 40x60 -> ratio 0.67 -> 0.68 bucket


def test_info_lists_the_image_encoder(v4_root, capsys):
    assert main(["info", str(v4_root)]) == 0
    out = capsys.readouterr().out
    assert "EasyAnimate V4 transformer" in out and "EasyAnimate V4 vae" in out and "image_encoder: present" in out


# ------------------------------------------------------------------------------------------------ pipeline


def test_clip_features_reach_the_conditional_branch_on_the_last_40_percent_of_steps(models):
    transformer = models["transformer"]
    seen = []
    original = transformer.forward

    def spy(*args, **kwargs):
        mask = kwargs.get("clip_attention_mask")
        seen.append(None if mask is None else mask[:, 0].tolist())
        assert kwargs["text_embedding_mask"].shape == (2, 77) and kwargs["text_embedding_mask_t5"].shape == (2, 256)
        return original(*args, **kwargs)

    transformer.forward = spy
    try:
        generate(
            transformer,
            models["vae"],
            models["prompts"],
            make_sampler("Euler", "V4", 5),
            frames=8,
            height=HEIGHT,
            width=WIDTH,
            guidance=7.0,
            start_image=torch.rand(HEIGHT, WIDTH, 3),
            image_encoder=models["image_encoder"],
        )
    finally:
        del transformer.forward
    # 5 steps: 5 * 0.6 = 3 steps with the learned padding for both branches, then [uncond 0 ; cond 1].
    assert seen == [None, None, None, [0.0, 1.0], [0.0, 1.0]]


def test_clip_schedule_of_the_released_25_steps():
    features = torch.randn(1, 16, 8)
    schedule = clip_step_inputs(features, 4, 25, 0.4)
    with_image = [i for i in range(25) if schedule(i)[1]]
    assert with_image == list(range(15, 25))
    uncond, cond = schedule(20)
    assert torch.equal(cond["clip_encoder_hidden_states"], features) and cond["clip_attention_mask"].sum() == 4
    assert uncond["clip_encoder_hidden_states"].abs().sum() == 0 and uncond["clip_attention_mask"].sum() == 0
    assert clip_step_inputs(None, 4, 25, 0.4)(24) == ({}, {})


def test_mask_and_masked_video_go_through_the_vae(models):
    vae = models["vae"]
    size = snap_size(FRAMES, HEIGHT, WIDTH, vae)
    shape = (1, 4, vae.latent_frames(FRAMES), HEIGHT // 8, WIDTH // 8)
    start = torch.rand(HEIGHT, WIDTH, 3)
    video, mask = image_to_video_inputs(start, None, size)
    latents = encoded_mask_inpaint_latents(vae, video, mask, shape, torch.Generator().manual_seed(3), "cpu")
    g = torch.Generator().manual_seed(3)
    expected_mask = encode_sample(vae, mask.expand(-1, 3, -1, -1, -1), "cpu", g)
    expected_video = encode_sample(vae, torch.where(mask < 0.5, video, torch.full_like(video, -1.0)), "cpu", g)
    assert latents.shape == (1, 8, *shape[2:])
    assert torch.equal(latents, torch.cat([expected_mask, expected_video], dim=1))
    nothing_kept = encoded_mask_inpaint_latents(vae, None, None, shape, torch.Generator(), "cpu")
    assert nothing_kept.shape == (1, 8, *shape[2:]) and not nothing_kept.any()


def test_image_to_video_needs_the_image_encoder(models):
    with pytest.raises(ValueError, match="image_encoder=load_image_encoder"):
        generate(
            models["transformer"],
            models["vae"],
            models["prompts"],
            make_sampler("Euler", "V4", 2),
            frames=8,
            height=HEIGHT,
            width=WIDTH,
            start_image=torch.rand(HEIGHT, WIDTH, 3),
        )


def test_a_v4_transformer_needs_the_slice_vae(models):
    from easyanimate_core.vae import MagvitVAE, VAEConfig
    from tests.tiny_checkpoint import VAE_CONFIG

    with pytest.raises(ValueError, match="use the V4 model's own VAE"):
        generate(
            models["transformer"],
            MagvitVAE(VAEConfig.from_dict(VAE_CONFIG)),
            models["prompts"],
            make_sampler("Euler", "V4", 2),
        )


def test_frames_snap_to_multiples_of_8(models, caplog):
    with caplog.at_level(logging.WARNING):
        size = snap_size(20, HEIGHT, WIDTH, models["vae"])
    assert size.frames == 16 and "must be 1 or a multiple of 8" in caplog.text
    assert snap_size(1, HEIGHT, WIDTH, models["vae"]).frames == 1


@pytest.mark.parametrize(
    "height, width, resolution, expected",
    [
        (384, 672, 512, (384, 672)),
        (384, 672, 1024, (768, 1344)),
        (1080, 1920, 960, (720, 1260 // 16 * 16)),
        (512, 512, 1280, (1280, 1280)),
        (1000, 250, 768, (1536, 384)),
    ],
)
def test_size_buckets(height, width, resolution, expected):
    assert size_bucket(height, width, resolution) == expected


def test_size_bucket_refuses_other_resolutions():
    with pytest.raises(ValueError, match="resolution must be one of 512, 768, 960, 1024, 1280"):
        size_bucket(384, 672, 640)
