"""Optional parity with the official EasyAnimate ``AutoencoderKLMagvit`` (V4 slice VAE, V5 mag VAE).

The official code is the only reference for the V4 slice VAE (``cache_compression_vae``, chunk-wide
GroupNorm, "3d" mid attention) and for V5's per-frame ("spatial") mid attention. It is not a
dependency: point ``EASYANIMATE_OFFICIAL_PATH`` at an extracted checkout of aigc-apps/EasyAnimate (the
directory that contains ``easyanimate/``) to run these tests; they are skipped otherwise. Only the VAE
module and its building blocks are imported (with stub parent packages), so the rest of the official
repository's dependencies are not needed; diffusers is.

Bound: max|ours - official| <= 1e-5 * max|official| in float32.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from easyanimate_core.vae import MagvitVAE, VAEConfig
from tests.vae_fixtures import perturb_, rel_diff, video

OFFICIAL = os.environ.get("EASYANIMATE_OFFICIAL_PATH")
pytestmark = pytest.mark.skipif(
    not OFFICIAL, reason="set EASYANIMATE_OFFICIAL_PATH to an extracted official EasyAnimate checkout to run"
)

BASE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[8, 16, 32, 32],
    down_block_types=["SpatialDownBlock3D"] + ["SpatialTemporalDownBlock3D"] * 3,
    up_block_types=["SpatialUpBlock3D"] + ["SpatialTemporalUpBlock3D"] * 3,
    layers_per_block=2,  # one mid-block attention between the two mid resnets
    norm_num_groups=4,
    slice_mag_vae=False,
    slice_compression_vae=False,
)
V4_SLICE = dict(
    BASE,
    mid_block_use_attention=True,
    mid_block_attention_type="3d",
    cache_compression_vae=True,
    cache_mag_vae=False,
    mini_batch_encoder=8,
    mini_batch_decoder=2,
    spatial_group_norm=False,
)
V5_MAG = dict(
    BASE,
    mid_block_use_attention=True,
    mid_block_attention_type="spatial",
    cache_compression_vae=False,
    cache_mag_vae=True,
    mini_batch_encoder=4,
    mini_batch_decoder=1,
    spatial_group_norm=True,
)


def official_class():
    """The official AutoencoderKLMagvit, imported without running easyanimate/__init__.py."""
    root = Path(OFFICIAL).resolve()
    module_file = root / "easyanimate" / "models" / "autoencoder_magvit.py"
    if not module_file.is_file():
        pytest.fail(f"EASYANIMATE_OFFICIAL_PATH={OFFICIAL} has no easyanimate/models/autoencoder_magvit.py")
    for name, path in (("easyanimate", root / "easyanimate"), ("easyanimate.models", root / "easyanimate/models")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    name = "easyanimate.models.autoencoder_magvit"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, module_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].AutoencoderKLMagvit


def build_pair(config: dict, seed: int):
    torch.manual_seed(seed)
    ref = perturb_(official_class()(**config), seed)
    ours = MagvitVAE(VAEConfig.from_dict(config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def compare(ref, ours, frames: int):
    x = video(frames, size=32)
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        z = posterior.mode()
        expected = ref.decode(z).sample
    mean, logvar = ours.encode(x)
    decoded = ours.decode(z)
    return [
        ("mean", rel_diff(mean, posterior.mean)),
        ("logvar", rel_diff(logvar, posterior.logvar)),
        ("decode", rel_diff(decoded, expected)),
    ]


@pytest.mark.parametrize("frames", [1, 8, 16, 24])
def test_v4_slice_vae_matches_official(frames):
    ref, ours = build_pair(V4_SLICE, seed=7)
    assert ours.config.temporal_mode == "slice" and ours.config.mid_block_attention == "3d"
    for name, rel in compare(ref, ours, frames):
        assert rel <= 1e-5, (name, rel)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_v5_mag_vae_with_spatial_attention_matches_official(frames):
    ref, ours = build_pair(V5_MAG, seed=8)
    assert ours.config.temporal_mode == "mag" and ours.config.mid_block_attention == "spatial"
    for name, rel in compare(ref, ours, frames):
        assert rel <= 1e-5, (name, rel)
