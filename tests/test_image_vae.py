"""V1's per-frame image VAE (``easyanimate_core.image_vae``): parity with diffusers' ``AutoencoderKL``, the official
V1 pipeline's frame folding, detection and loading.

The official V1 pipeline (aigc-apps/EasyAnimate f9eeabe, ``easyanimate/pipeline/pipeline_easyanimate*.py``, the
branches where ``vae.quant_conv.weight.ndim != 5``) runs a diffusers ``AutoencoderKL``: diffusers is the reference.
Its fold / loop code is restated here (``official_*``); set ``EASYANIMATE_OFFICIAL_V3_PATH`` to an extracted checkout
of that commit to run the official methods themselves. Bound: max|ours - reference| <= 1e-5 * max|reference| (fp32).
"""

from __future__ import annotations

import functools
import json
import os
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from easyanimate_core.image_vae import (
    IMAGE_VAE_SD,
    ImageVAE,
    ImageVAEConfig,
    canonical_key,
    sample_posterior,
)
from easyanimate_core.loading import inspect_checkpoint, load_vae
from easyanimate_core.ops import manual_cast
from tests.official_code import official_module

diffusers = pytest.importorskip("diffusers", reason="diffusers is the parity reference (pip install -e '.[test]')")

# Tiny AutoencoderKL: 2 levels (2x compression), 2 resnets per level, GroupNorm 4, mid-block attention.
TINY = dict(
    block_out_channels=(8, 16),
    layers_per_block=2,
    norm_num_groups=4,
    latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
)
B, F, H, W = 2, 3, 16, 32  # a video [B, 3, F, H, W]; latents [B, 4, F, 8, 16]


def seeded_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (std 0.3, so every layer changes the output visibly), reproducible per key."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.state_dict().items()}


@functools.cache
def _state(config_items: tuple) -> dict[str, torch.Tensor]:
    return seeded_state(diffusers.AutoencoderKL(**dict(config_items)))


def reference(**overrides) -> diffusers.AutoencoderKL:
    cfg = {**TINY, **overrides}
    model = diffusers.AutoencoderKL(**cfg).eval()
    model.load_state_dict(_state(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))))
    return model


def ours_like(ref: diffusers.AutoencoderKL, **kwargs) -> ImageVAE:
    model = ImageVAE(ImageVAEConfig.from_dict(dict(ref.config)), **kwargs).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def video(seed: int = 1) -> torch.Tensor:
    return torch.rand(B, 3, F, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(seed: int = 2) -> torch.Tensor:
    return torch.randn(B, 4, F, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


def fold(x: torch.Tensor) -> torch.Tensor:
    """The official ``rearrange(x, "b c f h w -> (b f) c h w")``."""
    return x.transpose(1, 2).flatten(0, 1)


def unfold(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The official ``rearrange(x, "(b f) c h w -> b c f h w", f=frames)``."""
    return x.unflatten(0, (-1, frames)).transpose(1, 2)


def official_decode_latents(vae: diffusers.AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """pipeline_easyanimate.py:579-604, image-VAE branch: fold, decode one image at a time, unfold, to [0, 1]."""
    frames = latents.shape[2]
    folded = fold(latents / vae.config.scaling_factor)
    with torch.no_grad():
        images = torch.cat([vae.decode(folded[i : i + 1]).sample for i in range(folded.shape[0])])
    return (unfold(images, frames) / 2 + 0.5).clamp(0, 1)


def official_encode(vae: diffusers.AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """pipeline_easyanimate_inpaint.py:565-569 + _encode_vae_image: fold, latent_dist.sample(generator), scale."""
    with torch.no_grad():
        sample = vae.encode(fold(pixels)).latent_dist.sample(generator)
    return unfold(sample * vae.config.scaling_factor, pixels.shape[2])


# ------------------------------------------------------------------------------------------------ graph


def test_state_dict_equals_diffusers_at_the_released_geometry():
    with torch.device("meta"):
        sd_vae = diffusers.AutoencoderKL(  # stabilityai/sd-vae-ft-ema's config.json, which PixArt-alpha ships
            block_out_channels=(128, 256, 512, 512),
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
        )
        expected = {k: tuple(v.shape) for k, v in sd_vae.state_dict().items()}
        actual = {k: tuple(v.shape) for k, v in ImageVAE(IMAGE_VAE_SD).state_dict().items()}
    assert actual == expected
    assert len(actual) == 248


def test_layers_come_from_the_operations_namespace():
    model = ImageVAE(ImageVAEConfig(**{k: v for k, v in TINY.items() if "types" not in k}), operations=manual_cast)
    kinds = {type(m).__name__ for m in model.modules() if list(m.parameters(recurse=False))}
    assert kinds == {"CastConv2d", "CastGroupNorm", "CastLinear"}


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("attention", [True, False])
def test_encode_moments_match_diffusers(attention):
    ref = reference(mid_block_add_attention=attention)
    ours = ours_like(ref)
    x = video()
    with torch.no_grad():
        dist = ref.encode(fold(x)).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == logvar.shape == (B, 4, F, H // 2, W // 2)
    assert rel(mean, unfold(dist.mean, F)) <= 1e-5
    assert rel(logvar, unfold(dist.logvar, F)) <= 1e-5


@pytest.mark.parametrize("attention", [True, False])
def test_decode_matches_diffusers_per_frame(attention):
    ref = reference(mid_block_add_attention=attention)
    z = latents()
    out = ours_like(ref).decode(z)
    assert out.shape == (B, 3, F, H, W)
    for f in range(F):
        with torch.no_grad():
            assert rel(out[:, :, f], ref.decode(z[:, :, f]).sample) <= 1e-5


def test_mid_attention_is_live():
    """The parity above sees the attention: perturbing it changes the decoded frames visibly."""
    ours = ours_like(reference())
    z = latents()
    before = ours.decode(z)
    with torch.no_grad():
        ours.decoder.mid_block.attentions[0].to_v.weight.add_(0.05)
    assert rel(ours.decode(z), before) > 1e-3


def test_decode_equals_the_official_per_frame_loop():
    ref = reference()
    z = latents() * ref.config.scaling_factor  # DiT-space latents, as the pipeline holds them
    expected = official_decode_latents(ref, z)
    ours = ours_like(ref)
    actual = (ours.decode(z / ours.config.scaling_factor) / 2 + 0.5).clamp(0, 1)
    assert rel(actual, expected) <= 1e-5


def test_sampled_latents_equal_the_official_encode():
    """Same generator, same numbers: the noise is drawn per folded frame image, as latent_dist.sample does."""
    ref = reference()
    x = video()
    expected = official_encode(ref, x, torch.Generator().manual_seed(7))
    ours = ours_like(ref)
    mean, logvar = ours.encode(x)
    actual = sample_posterior(mean, logvar, torch.Generator().manual_seed(7)) * ours.config.scaling_factor
    assert rel(actual, expected) <= 1e-5
    assert rel(actual, mean * ours.config.scaling_factor) > 1e-2  # the noise is there


# ------------------------------------------------------------------------------------------------ folding


def test_frames_are_independent_images_whatever_the_chunk():
    ours = ours_like(reference())
    x, z = video(), latents()
    mean, logvar = ours.encode(x)
    dec = ours.decode(z)
    for f in range(F):  # each frame alone (one-frame videos) gives the same numbers
        m1, lv1 = ours.encode(x[:, :, f : f + 1])
        assert rel(m1[:, :, 0], mean[:, :, f]) <= 1e-6 and rel(lv1[:, :, 0], logvar[:, :, f]) <= 1e-6
        assert rel(ours.decode(z[:, :, f : f + 1])[:, :, 0], dec[:, :, f]) <= 1e-6
    assert rel(ours.encode(x, chunk_frames=2)[0], mean) <= 1e-6
    assert rel(ours.decode(z, chunk_latents=2), dec) <= 1e-6
    assert rel(ours.decode(z, chunk_latents=F, frame_by_frame=False), dec) <= 1e-6


def test_progress_and_preallocated_output():
    ours = ours_like(reference())
    calls = []
    out = torch.full((B, 3, F, H, W), float("nan"))
    result = ours.decode(latents(), out=out, progress=lambda done, total: calls.append((done, total)))
    assert result is out and not out.isnan().any()
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    ours.encode(video(), chunk_frames=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]


def test_tiles_away_from_the_overlap_are_the_tile_alone():
    """Two tiles along the width (10 latent px from 0 and 6): outside the blend band a value is its own tile's."""
    ref = reference()
    ours = ours_like(ref)
    z, x = latents(), video()  # latent width 16
    tiled = fold(ours.decode(z, tile_latent_size=10, tile_overlap=4))
    with torch.no_grad():
        left = ref.decode(fold(z[..., :10])).sample
        right = ref.decode(fold(z[..., 6:])).sample
    assert rel(tiled[..., :12], left[..., :12]) <= 1e-5  # pixels 0..11: latents 0..5, the left tile's alone
    assert rel(tiled[..., 20:], right[..., 8:]) <= 1e-5  # pixels 20..31: latents 10..15, the right tile's
    assert rel(tiled[..., 12:20], left[..., 12:20]) > 1e-3  # the band is a blend, not either tile
    mean, _ = ours.encode(x, tile_latent_size=10, tile_overlap=4)
    with torch.no_grad():
        left_mean = ref.encode(fold(x[..., :20])).latent_dist.mean
        right_mean = ref.encode(fold(x[..., 12:])).latent_dist.mean
    assert rel(fold(mean)[..., :6], left_mean[..., :6]) <= 1e-5
    assert rel(fold(mean)[..., 10:], right_mean[..., 4:]) <= 1e-5


# ------------------------------------------------------------------------------------------------ interface


def test_video_interface_of_the_pipeline():
    cfg = IMAGE_VAE_SD
    assert (cfg.temporal_mode, cfg.temporal_compression, cfg.spatial_compression) == ("image", 1, 8)
    assert (cfg.latent_channels, cfg.scaling_factor, cfg.pixel_multiple) == (4, 0.18215, 16)
    assert [cfg.latent_frames(n) for n in (1, 7, 144)] == [1, 7, 144]
    assert [cfg.video_frames(n) for n in (1, 7, 144)] == [1, 7, 144]
    assert cfg.nearest_frames(13) == (13, "any number of frames")
    assert cfg.nearest_frames(0) == (1, "any number of frames")
    ours = ours_like(reference())
    assert ours.frame_local and ours.latent_frames(5) == 5 and ours.video_frames(5) == 5
    ours.clear_caches()
    ours.check_video_shape((1, 3, 1, 16, 16))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.encode(torch.zeros(1, 3, 16, 16)), "5 dims"),
        (lambda m: m.encode(torch.zeros(1, 4, 1, 16, 16)), "4 channels, expected 3"),
        (lambda m: m.encode(torch.zeros(1, 3, 1, 16, 24)), "width 24 is not a multiple of 16; nearest valid: 16 or 32"),
        (lambda m: m.encode(torch.zeros(1, 3, 0, 16, 16)), "at least 1 frame"),
        (lambda m: m.encode(torch.zeros(1, 3, 1, 16, 16), chunk_frames=0), "chunk_frames must be >= 1"),
        (lambda m: m.decode(torch.zeros(1, 4, 8, 8)), "5 dims"),
        (lambda m: m.decode(torch.zeros(1, 16, 1, 8, 8)), "16 channels, expected latent_channels=4"),
        (lambda m: m.decode(torch.zeros(1, 4, 1, 8, 8), tile_latent_size=4, tile_overlap=4), "tile_overlap"),
        (lambda m: m.decode(torch.zeros(1, 4, 1, 8, 8), out=torch.zeros(1, 3, 1, 8, 8)), "out must be"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call(ours_like(reference()))


def test_config_from_diffusers_json_and_refusals():
    cfg = ImageVAEConfig.from_dict(dict(reference().config, scaling_factor=0.13025))
    assert (cfg.block_out_channels, cfg.norm_num_groups, cfg.scaling_factor) == ((8, 16), 4, 0.13025)
    with pytest.raises(ValueError, match="norm_num_groups"):
        ImageVAEConfig(block_out_channels=(8, 16))
    with pytest.raises(ValueError, match="use_quant_conv"):
        ImageVAEConfig.from_dict({"use_quant_conv": False})
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        ImageVAEConfig.from_dict({"down_block_types": ["SpatialDownBlock3D"]})
    with pytest.raises(ValueError, match="shift_factor"):
        ImageVAEConfig.from_dict({"shift_factor": 0.1159})


def test_canonical_key_renames_only_old_attention_names():
    assert canonical_key("encoder.mid_block.attentions.0.query.weight") == "encoder.mid_block.attentions.0.to_q.weight"
    assert (
        canonical_key("decoder.mid_block.attentions.0.proj_attn.bias") == "decoder.mid_block.attentions.0.to_out.0.bias"
    )
    assert canonical_key("decoder.mid_block.attentions.0.group_norm.weight").endswith("group_norm.weight")
    assert (
        canonical_key("encoder.down_blocks.0.resnets.0.conv1.weight") == "encoder.down_blocks.0.resnets.0.conv1.weight"
    )


# ------------------------------------------------------------------------------------------------ loading

_OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def write_vae(folder: Path, ref: diffusers.AutoencoderKL, old_names: bool, config: dict | None) -> Path:
    """A diffusers-style vae/ folder: one safetensors file, attention under old or new names, optional config."""
    state = {}
    for k, v in ref.state_dict().items():
        for new, old in _OLD_NAMES.items():
            if old_names and f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        state[k] = v.contiguous()
    folder.mkdir(parents=True)
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("old_names", [False, True])
def test_detect_and_load_round_trip_with_config(tmp_path, old_names):
    ref = reference()
    config = {**dict(ref.config), "scaling_factor": 0.13025}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    write_vae(tmp_path / "model" / "vae", ref, old_names, config)
    info = inspect_checkpoint(tmp_path / "model", "vae")
    assert (info.version, info.variant, info.layout) == ("V1", "image", "diffusers")
    cfg = info.config
    assert (cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels) == ((8, 16), 2, 4)
    assert (cfg.norm_num_groups, cfg.scaling_factor, cfg.mid_block_attention) == (4, 0.13025, True)
    vae = load_vae(tmp_path / "model")
    assert isinstance(vae, ImageVAE) and vae.info.version == "V1"
    expected = ref.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in vae.state_dict().items())
    with torch.no_grad():
        assert rel(vae.decode(latents())[:, :, 0], ref.decode(latents()[:, :, 0]).sample) <= 1e-5


@pytest.mark.parametrize("old_names", [False, True])
def test_detect_without_config_uses_the_sd_settings(tmp_path, old_names):
    ref = reference(block_out_channels=(32, 64), norm_num_groups=32, layers_per_block=1)
    path = write_vae(tmp_path / "vae", ref, old_names, None) / "diffusion_pytorch_model.safetensors"
    info = inspect_checkpoint(path, "vae")
    assert (info.version, info.variant) == ("V1", "image")
    assert (info.config.block_out_channels, info.config.layers_per_block) == ((32, 64), 1)
    assert (info.config.norm_num_groups, info.config.scaling_factor) == (32, 0.18215)
    assert any("no config.json" in n for n in info.notes)
    vae = load_vae(path, dtype=torch.bfloat16)
    assert vae.post_quant_conv.weight.dtype == torch.bfloat16
    stored = ref.state_dict()["encoder.mid_block.attentions.0.to_out.0.weight"]  # proj_attn in the old-style file
    assert torch.equal(vae.encoder.mid_block.attentions[0].to_out[0].weight, stored.bfloat16())


def test_detection_errors_are_clear(tmp_path):
    ref = reference()
    write_vae(tmp_path / "no_config", ref, False, None)
    with pytest.raises(ValueError, match="norm_num_groups"):
        inspect_checkpoint(tmp_path / "no_config", "vae")
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("quant_conv")}
    (tmp_path / "no_quant").mkdir()
    save_file(state, tmp_path / "no_quant" / "vae.safetensors")
    with pytest.raises(ValueError, match="without \\['quant_conv.weight'\\]"):
        inspect_checkpoint(tmp_path / "no_quant", "vae")
    both = dict(ref.state_dict())
    both["encoder.mid_block.attentions.0.query.weight"] = both["encoder.mid_block.attentions.0.to_q.weight"].clone()
    (tmp_path / "both").mkdir()
    save_file({k: v.contiguous() for k, v in both.items()}, tmp_path / "both" / "vae.safetensors")
    with pytest.raises(ValueError, match="old and new name"):
        inspect_checkpoint(tmp_path / "both", "vae")


# ------------------------------------------------------------------------------------------------ official code


def official_pipelines(root: str):
    """The official V3-era pipeline classes (text-to-video, inpaint)."""
    t2v = official_module(root, "easyanimate.pipeline.pipeline_easyanimate").EasyAnimatePipeline
    inpaint = official_module(root, "easyanimate.pipeline.pipeline_easyanimate_inpaint").EasyAnimateInpaintPipeline
    return t2v, inpaint


@pytest.mark.skipif(not os.environ.get("EASYANIMATE_OFFICIAL_V3_PATH"), reason="set EASYANIMATE_OFFICIAL_V3_PATH")
def test_matches_the_official_pipeline_methods():
    t2v, inpaint = official_pipelines(os.environ["EASYANIMATE_OFFICIAL_V3_PATH"])
    ref = reference()
    ours = ours_like(ref)
    pipe = types.SimpleNamespace(vae=ref)
    pipe._encode_vae_image = functools.partial(inpaint._encode_vae_image, pipe)
    z = latents() * ref.config.scaling_factor
    ours_video = (ours.decode(z / ours.config.scaling_factor) / 2 + 0.5).clamp(0, 1)
    with torch.no_grad():  # the official __call__ runs under no_grad
        for cls in (t2v, inpaint):
            assert rel(ours_video, torch.from_numpy(cls.decode_latents(pipe, z))) <= 1e-5
        mask, masked = video(3), video(4)
        g = torch.Generator().manual_seed(5)
        mask_latents, masked_latents = inpaint.prepare_mask_latents(
            pipe, mask, masked, B, H, W, torch.float32, "cpu", g, False
        )
    g = torch.Generator().manual_seed(5)
    for actual, pixels in ((mask_latents, mask), (masked_latents, masked)):
        mean, logvar = ours.encode(pixels)
        assert rel(sample_posterior(mean, logvar, g) * ours.config.scaling_factor, actual) <= 1e-5
