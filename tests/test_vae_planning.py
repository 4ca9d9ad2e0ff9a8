"""Core helpers behind the VAE nodes: memory estimates, chunk / tile planning, out-of-memory retry, preview colours."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import easyanimate_core.preview as preview
from easyanimate_core.vae import (
    VAE_V4,
    VAE_V51,
    ChunkTile,
    MagvitVAE,
    VAEConfig,
    decode_memory,
    decode_with_retry,
    encode_memory,
    encode_with_retry,
    plan_decode,
    plan_encode,
    retry_on_oom,
    smaller_settings,
)
from tests.tiny_checkpoint import VAE_CONFIG, write_tiny_checkpoint

F32 = torch.float32


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return MagvitVAE(VAEConfig.from_dict(VAE_CONFIG)).eval()


# ---- memory estimates and plans ----------------------------------------------------------------------------


def test_decode_memory_follows_the_measured_model():
    """Frame by frame: independent of the length, linear in the tile area, bf16 half of fp32."""
    short = decode_memory(VAE_V51, (1, 16, 2, 48, 84), F32)
    assert decode_memory(VAE_V51, (1, 16, 37, 48, 84), F32) == short
    assert decode_memory(VAE_V51, (2, 16, 2, 48, 84), F32) == 2 * short
    assert decode_memory(VAE_V51, (1, 16, 2, 48, 84), torch.bfloat16) == short // 2
    assert decode_memory(VAE_V51, (1, 16, 2, 48, 84), F32, tile=24) == pytest.approx(short * 24 * 24 / (48 * 84))
    # 49 frames at 672x384 in bf16: about 3.3 GB of working memory.
    assert decode_memory(VAE_V51, (1, 16, 13, 48, 84), torch.bfloat16) / 1e9 == pytest.approx(3.29, abs=0.01)
    # The V4 slice VAE runs every stage on a whole chunk: memory grows with it.
    assert decode_memory(VAE_V4, (1, 4, 4, 48, 84), F32, 2) > 4 * decode_memory(VAE_V51, (1, 16, 4, 48, 84), F32)


def test_encode_memory_grows_with_the_chunk_of_frames():
    four = encode_memory(VAE_V51, (1, 3, 49, 384, 672), F32, 4)
    eight = encode_memory(VAE_V51, (1, 3, 49, 384, 672), F32, 8)
    assert four < eight < 2 * four
    assert encode_memory(VAE_V51, (1, 3, 49, 384, 672), F32, 4, tile=24) < four / 3


def test_plan_decode_takes_the_largest_settings_that_fit(tiny_vae):
    shape = (1, 16, 13, 48, 84)
    roomy = plan_decode(tiny_vae, shape, F32, 1e15)
    assert roomy == ChunkTile(8, None, None)  # untiled; chunk capped for progress / interrupt granularity
    budget = decode_memory(tiny_vae.config, shape, F32, 8) / 4
    tight = plan_decode(tiny_vae, shape, F32, budget)
    assert tight.chunk == 1 and tight.tile is not None  # no chunk fits untiled: the smallest chunk, then tiles
    assert decode_memory(tiny_vae.config, shape, F32, 1, tight.tile) <= budget
    assert decode_memory(tiny_vae.config, shape, F32, 1, tight.tile + 1) > budget
    assert plan_decode(tiny_vae, shape, F32, 1.0).tile == 8  # nothing fits: the smallest tile, then OOM retry
    assert plan_decode(tiny_vae, shape, F32, 1.0, ChunkTile(3, 20, 2)) == ChunkTile(3, 20, 2)  # user values kept


def test_plan_encode_prefers_long_chunks_then_tiles(tiny_vae):
    shape = (1, 3, 49, 384, 672)
    assert plan_encode(tiny_vae, shape, F32, 1e15) == ChunkTile(48, None, None)
    budget = encode_memory(tiny_vae.config, shape, F32, 12)
    assert plan_encode(tiny_vae, shape, F32, budget) == ChunkTile(12, None, None)
    small = plan_encode(tiny_vae, shape, F32, encode_memory(tiny_vae.config, shape, F32, 4) / 2)
    assert small.chunk == 4 and small.tile is not None


def test_smaller_settings_shrink_tiles_for_decode_and_chunks_first_for_encode(tiny_vae):
    hw = (48, 84)
    steps, s = [], ChunkTile(8, None, None)
    while s is not None:
        steps.append((s.chunk, s.tile))
        s = smaller_settings(tiny_vae, hw, s, 1, chunk_first=False)
    assert steps == [(8, None), (1, 42), (1, 21), (1, 10)]  # 10 // 2 = 5 is below the 64-pixel floor
    steps, s = [], ChunkTile(16, None, 4)
    while s is not None:
        steps.append((s.chunk, s.tile, s.overlap))
        s = smaller_settings(tiny_vae, hw, s, 4, chunk_first=True)
    assert steps == [(16, None, 4), (8, None, 4), (4, None, 4), (4, 42, 4), (4, 21, 4), (4, 10, 2)]


# ---- out-of-memory retry -------------------------------------------------------------------------------


def test_retry_on_oom_shrinks_until_it_fits_and_reports_each_retry():
    tried, retries = [], []

    def run(s: ChunkTile):
        tried.append(s.tile)
        if s.tile is None or s.tile > 10:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.ones(1)

    def shrink(s):
        return ChunkTile(s.chunk, 40 if s.tile is None else s.tile // 2)

    retry_on_oom(run, ChunkTile(), shrink, on_retry=lambda s, e: retries.append((s.tile, e)))
    assert tried == [None, 40, 20, 10]
    assert retries == [(40, "CUDA out of memory"), (20, "CUDA out of memory"), (10, "CUDA out of memory")]


def test_retry_on_oom_gives_up_with_the_error_and_never_retries_other_errors():
    with pytest.raises(torch.OutOfMemoryError):
        retry_on_oom(lambda s: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), ChunkTile(), lambda s: None)
    calls = []

    def broken(s):
        calls.append(s)
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):
        retry_on_oom(broken, ChunkTile(), lambda s: ChunkTile(tile=1))
    assert len(calls) == 1


def test_decode_with_retry_equals_a_decode_with_the_settings_that_fit(tiny_vae, monkeypatch):
    z = torch.randn(1, 16, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    expected = tiny_vae.decode(z, tile_latent_size=8)
    decode, calls = tiny_vae.decode, []

    def first_fails(*args, **kwargs):
        calls.append(kwargs["tile_latent_size"])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("oom")
        return decode(*args, **kwargs)

    monkeypatch.setattr(tiny_vae, "decode", first_fails)
    out = decode_with_retry(tiny_vae, z, ChunkTile(1, None, None))
    assert calls == [None, 8]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_encode_with_retry_returns_the_posterior_mean(tiny_vae):
    x = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, _ = tiny_vae.encode(x, chunk_frames=8)
    torch.testing.assert_close(encode_with_retry(tiny_vae, x, ChunkTile(8)), mean, rtol=0, atol=0)


# ---- preview colours ---------------------------------------------------------------------------------------


class LinearDecoder(torch.nn.Module):
    """A 'VAE' whose frame is a known linear map of each latent pixel, blurred a little (the fit must undo nothing)."""

    def __init__(self, factors: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.config = VAEConfig.from_dict(VAE_CONFIG)
        self.factors = torch.nn.Parameter(factors, requires_grad=False)
        self.bias = bias

    def decode(self, latents):  # [n, C, 1, h, w] -> [n, 3, 1, 8h, 8w]
        rgb = torch.einsum("nchw,cr->nrhw", latents[:, :, 0], self.factors) + self.bias[None, :, None, None]
        return F.interpolate(rgb, scale_factor=8, mode="nearest").unsqueeze(2)


def test_fit_recovers_a_linear_decoder_exactly():
    g = torch.Generator().manual_seed(3)
    factors, bias = torch.randn(16, 3, generator=g) * 0.2, torch.tensor([0.1, -0.2, 0.05])
    fit = preview.fit_latent_rgb(LinearDecoder(factors, bias))
    torch.testing.assert_close(torch.tensor(fit.factors), factors, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(fit.bias), bias, rtol=0, atol=1e-5)
    assert fit.rms_error < 1e-5 < fit.colour_rms
    scaled = fit.scaled(0.7125)  # model-space latents are VAE-space x 0.7125, so the factors divide by it
    assert scaled.factors[2][1] == pytest.approx(fit.factors[2][1] / 0.7125) and scaled.bias == fit.bias


def test_fit_on_the_tiny_random_vae_is_the_least_squares_optimum(tiny_vae):
    fit = preview.fit_latent_rgb(tiny_vae)
    assert torch.tensor(fit.factors).shape == (16, 3) and len(fit.bias) == 3
    # A random VAE is far from linear; the fit still beats the best constant colour on its own samples.
    assert 0 < fit.rms_error < fit.colour_rms


def test_latent_rgb_for_checkpoint_is_cached_per_vae_file(tmp_path, monkeypatch):
    root = write_tiny_checkpoint(tmp_path / "model", "InP")
    cache = tmp_path / "cache"
    first = preview.latent_rgb_for_checkpoint(root, cache)
    (saved,) = cache.glob("*.json")
    assert json.loads(saved.read_text())["factors"] == first.factors
    monkeypatch.setattr(preview, "_MEMORY", {})  # a new server process: only the file remains
    monkeypatch.setattr(preview, "fit_latent_rgb", lambda vae: pytest.fail("refitted although cached"))
    assert preview.latent_rgb_for_checkpoint(root, cache) == first
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(1, 1))  # a changed file is a new key, so a new fit
    with pytest.raises(pytest.fail.Exception, match="refitted"):
        preview.latent_rgb_for_checkpoint(root, cache)
