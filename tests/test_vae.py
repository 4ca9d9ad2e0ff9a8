"""MagvitVAE: parity with diffusers, chunking/caching/causality rules, tiling, validation, key layout.

Bounds used below (all float32 on CPU):
* parity with diffusers: max|ours - ref| <= 1e-5 * max|ref| (observed: 0 with per-frame norm).
* chunked vs unchunked and frame-by-frame vs chunked: <= 1e-6 * max|ref| (same ops, only the conv
  call boundaries move; observed exactly 0 on this machine).
* causality probes: outputs that must not depend on a perturbed input are compared exactly (==).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from easyanimate_core.vae import VAE_V4, VAE_V5, VAE_V51, MagvitVAE, VAEConfig
from tests.manifest import manifest
from tests.vae_fixtures import TINY, TINY_V4, TINY_V5, TINY_V51, latents, perturb_, rel_diff, tiny_vae, video

EXACT = 1e-6
# Batched convs block their loops differently, so rounding moves slightly (observed ~2e-6).
BATCH = 1e-5


@pytest.fixture(scope="module")
def v51():
    return tiny_vae(TINY_V51)


@pytest.fixture(scope="module")
def v5():
    return tiny_vae(TINY_V5, seed=3)


@pytest.fixture(scope="module")
def v4():
    return tiny_vae(TINY_V4, seed=4)


# ---- parity with diffusers ------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_group_norm", [True, False])
def test_parity_with_diffusers(spatial_group_norm):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the parity reference")
    cfg = dict(TINY, block_out_channels=list(TINY["block_out_channels"]), spatial_group_norm=spatial_group_norm)
    torch.manual_seed(0)
    ref = perturb_(diffusers.AutoencoderKLMagvit(**cfg), seed=5)
    ours = MagvitVAE(VAEConfig.from_dict(dict(cfg, _class_name="AutoencoderKLMagvit"))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    for frames in (1, 5, 9):
        x = video(frames, size=32)
        with torch.no_grad():
            post = ref.encode(x).latent_dist
            z = post.mean
            expected = ref.decode(z).sample
        mean, logvar = ours.encode(x)
        assert rel_diff(mean, post.mean) <= 1e-5
        assert rel_diff(logvar, post.logvar) <= 1e-5
        assert rel_diff(ours.decode(z), expected) <= 1e-5


# ---- temporal chunking ----------------------------------------------------------------------------


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 4])  # 1, 5, 9, 13 pixel frames
def test_mag_decode_chunk_size_does_not_change_output(v51, latent_frames):
    z = latents(latent_frames)
    full = v51.decode(z, chunk_latents=latent_frames, frame_by_frame=False)
    assert full.shape[2] == 4 * (latent_frames - 1) + 1
    for chunk in (1, 2, 4):
        assert rel_diff(v51.decode(z, chunk_latents=chunk, frame_by_frame=False), full) <= EXACT
    # The default runs every stage one frame at a time (caches carry the past): same numbers.
    assert rel_diff(v51.decode(z), full) <= EXACT


def test_mag_decode_with_spatial_attention_is_frame_local(v5):
    z = latents(3)
    full = v5.decode(z, chunk_latents=2, frame_by_frame=False)
    assert rel_diff(v5.decode(z, chunk_latents=1, frame_by_frame=True), full) <= EXACT


@pytest.mark.parametrize("frames", [8, 16, 24])
def test_slice_decoder_pairs_see_only_previous_pairs(v4, frames):
    z = latents(frames // 4)
    full = v4.decode(z)
    assert full.shape[2] == frames
    # Decoding a prefix of whole pairs gives exactly the prefix of the full decode.
    for pairs in range(1, frames // 8 + 1):
        assert torch.equal(v4.decode(z[:, :, : 2 * pairs]), full[:, :, : 8 * pairs])
    # The pair is part of the model (chunk-wide GroupNorm and 3-D attention): other sizes are refused.
    with pytest.raises(ValueError, match="part of the model and must be 2"):
        v4.decode(z, chunk_latents=1)


def test_slice_decode_single_latent_gives_single_frame(v4):
    assert v4.decode(latents(1)).shape[2] == 1


def test_mag_encode_chunk_size_does_not_change_output(v51):
    x = video(13)
    mean, logvar = v51.encode(x, chunk_frames=4)
    assert mean.shape[2] == 4
    for chunk in (8, 12):
        m, lv = v51.encode(x, chunk_frames=chunk)
        assert rel_diff(m, mean) <= EXACT and rel_diff(lv, logvar) <= EXACT


def test_slice_encoder_chunks_are_independent(v4):
    x = video(24)
    mean, _ = v4.encode(x)
    assert mean.shape[2] == 6
    for k in range(3):
        alone, _ = v4.encode(x[:, :, 8 * k : 8 * k + 8])
        assert rel_diff(alone, mean[:, :, 2 * k : 2 * k + 2]) <= EXACT
    assert v4.encode(video(1))[0].shape[2] == 1


# ---- causality probes -----------------------------------------------------------------------------


def test_mag_encoder_is_causal(v5):
    x = video(13)
    y = x.clone()
    y[:, :, 8] += 0.5  # frame 8 belongs to latent 2 (frames 5..8)
    a, _ = v5.encode(x)
    b, _ = v5.encode(y)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert not torch.equal(a[:, :, 2], b[:, :, 2])


def test_mag_decoder_is_causal(v5):
    z = latents(4)
    w = z.clone()
    w[:, :, 2] += 0.5  # latent 2 -> frames 5..8
    a, b = v5.decode(z), v5.decode(w)
    assert torch.equal(a[:, :, :5], b[:, :, :5])
    assert not torch.equal(a[:, :, 5:9], b[:, :, 5:9])


def test_slice_probes_match_the_official_behaviour(v4):
    # Spec 2.4: perturbing frame 12 of 16 changes only latents 2-3; latent 3 of 4 leaves frames 0-7.
    x = video(16)
    y = x.clone()
    y[:, :, 12] += 0.5
    a, b = v4.encode(x)[0], v4.encode(y)[0]
    assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.equal(a[:, :, 2:], b[:, :, 2:])
    z = latents(4)
    w = z.clone()
    w[:, :, 3] += 0.5
    c, d = v4.decode(z), v4.decode(w)
    assert torch.equal(c[:, :, :8], d[:, :, :8]) and not torch.equal(c[:, :, 8:], d[:, :, 8:])


# ---- tiling ---------------------------------------------------------------------------------------


def _two_tile_weights(n: int, overlap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear blend weights of two tiles of size n overlapping by ``overlap`` (they sum to 1)."""
    ramp = (torch.arange(overlap) + 0.5) / overlap
    first = torch.cat([torch.ones(n - overlap), 1 - ramp])
    second = torch.cat([ramp, torch.ones(n - overlap)])
    return first, second


def _blend_2x2(parts: dict, n: int, overlap: int, total: int) -> torch.Tensor:
    """Stitch 2x2 tile results (keyed (iy, ix)) with separable linear weights."""
    w = _two_tile_weights(n, overlap)
    sample = next(iter(parts.values()))
    out = torch.zeros(*sample.shape[:3], total, total)
    for (iy, ix), part in parts.items():
        y0, x0 = iy * (total - n), ix * (total - n)
        out[..., y0 : y0 + n, x0 : x0 + n] += part * w[iy][:, None] * w[ix][None, :]
    return out


def test_tiled_decode_is_the_linear_blend_of_independent_tiles(v51):
    # Latent 6x6, tiles of 4 with 2 of overlap -> 2x2 tiles, 16 blended pixels between neighbours.
    z = latents(2, size=6)
    full = v51.decode(z)
    assert torch.equal(v51.decode(z, tile_latent_size=6), full)  # one tile == untiled, exactly
    parts = {(iy, ix): v51.decode(z[..., 2 * iy : 2 * iy + 4, 2 * ix : 2 * ix + 4]) for iy in (0, 1) for ix in (0, 1)}
    expected = _blend_2x2(parts, n=32, overlap=16, total=48)
    assert rel_diff(v51.decode(z, tile_latent_size=4, tile_overlap=2), expected) <= EXACT
    # Closeness to the untiled decode cannot be bounded tightly with random weights: each tile has its
    # own per-frame GroupNorm statistics and zero padding at its borders (measured 0.5-0.95 of max|ref|
    # here). Bound that always holds: the blend is convex, so it never leaves the tiles' range.
    lo = torch.stack(list(parts.values())).amin().item()
    hi = torch.stack(list(parts.values())).amax().item()
    tiled = v51.decode(z, tile_latent_size=4, tile_overlap=2)
    assert lo - 1e-6 <= tiled.min().item() and tiled.max().item() <= hi + 1e-6


def test_tiled_encode_is_the_linear_blend_of_independent_tiles(v51):
    x = video(5, size=48)
    mean, _ = v51.encode(x)
    assert torch.equal(v51.encode(x, tile_latent_size=6)[0], mean)
    parts = {
        (iy, ix): v51.encode(x[..., 16 * iy : 16 * iy + 32, 16 * ix : 16 * ix + 32])[0]
        for iy in (0, 1)
        for ix in (0, 1)
    }
    expected = _blend_2x2(parts, n=4, overlap=2, total=6)
    assert rel_diff(v51.encode(x, tile_latent_size=4, tile_overlap=2)[0], expected) <= EXACT


# ---- batch, out=, progress, caches ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["v51", "v4"])
def test_batch_of_two_equals_two_single_runs(name, request):
    vae = request.getfixturevalue(name)
    frames = 5 if name == "v51" else 8
    x = video(frames, batch=2)
    mean, logvar = vae.encode(x)
    out = vae.decode(mean)
    for i in range(2):
        m, lv = vae.encode(x[i : i + 1])
        assert rel_diff(mean[i : i + 1], m) <= BATCH and rel_diff(logvar[i : i + 1], lv) <= BATCH
        assert rel_diff(out[i : i + 1], vae.decode(m)) <= BATCH


def test_decode_writes_into_out_and_reports_progress(v51):
    z = latents(3)
    calls = []
    out = torch.full((1, 3, 9, 16, 16), float("nan"))
    result = v51.decode(z, out=out, progress=lambda done, total: calls.append((done, total)))
    assert result is out and not torch.isnan(out).any()
    assert calls == [(1, 3), (2, 3), (3, 3)]  # latent 0, then one call per later latent
    assert torch.equal(out, v51.decode(z))


def test_exception_mid_decode_leaves_no_dirty_cache(v51):
    z = latents(3)
    expected = v51.decode(z)

    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        v51.decode(z, progress=interrupt)
    assert all(len(getattr(m, "cache", ())) == 0 for m in v51.modules())
    assert torch.equal(v51.decode(z), expected)
    assert v51.decode(z[:, :, :1]).shape[2] == 1  # diffusers' bug gave 4 frames here


def test_no_buffers_in_state_dict(v5):
    v5.decode(latents(2))
    assert list(v5.buffers()) == []
    assert all(torch.is_tensor(v) for v in v5.state_dict().values())
    assert not any("cache" in k for k in v5.state_dict())


# ---- validation -----------------------------------------------------------------------------------


@pytest.fixture
def no_compute(v51, v4, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("computed before validating")

    for vae in (v51, v4):
        monkeypatch.setattr(vae.encoder, "forward", boom)
        monkeypatch.setattr(vae.decoder.conv_in, "forward", boom)
    return v51, v4


@pytest.mark.parametrize(
    "which, call, message",
    [
        ("mag", lambda v: v.encode(video(50)), "50 frames: the mag VAE expects 4k+1 frames; nearest valid: 49 or 53"),
        ("mag", lambda v: v.encode(video(6)), "nearest valid: 5 or 9"),
        (
            "slice",
            lambda v: v.encode(video(12)),
            "12 frames: the slice VAE expects a multiple of 8 frames (or 1); nearest valid: 8 or 16",
        ),
        ("mag", lambda v: v.encode(video(5, size=40)), "height 40 is not a multiple of 16; nearest valid: 32 or 48"),
        ("mag", lambda v: v.encode(video(5)[:, :2]), "2 channels, expected 3"),
        ("mag", lambda v: v.encode(video(5)[0]), "[B, C, F, H, W] (5 dims), got 4"),
        ("mag", lambda v: v.encode(video(5), chunk_frames=6), "chunk_frames must be a positive multiple of 4"),
        ("mag", lambda v: v.decode(latents(2, channels=16)), "16 channels, expected latent_channels=4"),
        ("mag", lambda v: v.decode(latents(2)[0]), "5 dims"),
        ("mag", lambda v: v.decode(latents(2), out=torch.empty(1, 3, 4, 16, 16)), "out must be a float tensor"),
        ("slice", lambda v: v.encode(video(8), chunk_frames=4), "part of the model and must be 8"),
        ("mag", lambda v: v.decode(latents(2), tile_latent_size=2, tile_overlap=2), "tile_overlap must be in [0, "),
        ("mag", lambda v: v.encode(video(5), tile_latent_size=0), "tile_latent_size must be >= 1"),
        ("slice", lambda v: v.decode(latents(2), frame_by_frame=True), "frame_by_frame needs the mag VAE"),
    ],
)
def test_bad_inputs_raise_before_compute(no_compute, which, call, message):
    vae = no_compute[0] if which == "mag" else no_compute[1]
    with pytest.raises(ValueError) as err:
        call(vae)
    assert message in str(err.value)


# ---- configuration and key layout -----------------------------------------------------------------


@pytest.mark.parametrize("preset, model", [(VAE_V4, "vae_v4_guess"), (VAE_V5, "vae_v5"), (VAE_V51, "vae_v51")])
def test_presets_match_the_released_keys_and_shapes(preset, model):
    vae = MagvitVAE(preset, device="meta")
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert ours == manifest(model)


def test_config_from_official_and_diffusers_dicts():
    official_v5 = {
        "_class_name": "AutoencoderKLMagvit",
        "latent_channels": 16,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "block_out_channels": None,
        "down_block_types": "['SpatialDownBlock3D','SpatialTemporalDownBlock3D','SpatialTemporalDownBlock3D',"
        "'SpatialTemporalDownBlock3D']",
        "mid_block_use_attention": True,
        "mid_block_attention_type": "spatial",
        "scaling_factor": 0.7125,
        "spatial_group_norm": True,
        "cache_mag_vae": True,
        "cache_compression_vae": False,
        "mini_batch_encoder": 4,
        "mini_batch_decoder": 1,
        "tile_sample_min_size": 384,
    }
    assert VAEConfig.from_dict(official_v5) == VAE_V5
    diffusers_v51 = {"_class_name": "AutoencoderKLMagvit", "_diffusers_version": "0.32.0", "latent_channels": 16}
    assert VAEConfig.from_dict(diffusers_v51) == VAE_V51
    v4 = dict(official_v5, latent_channels=4, mid_block_attention_type="3d", spatial_group_norm=False)
    v4.update(cache_mag_vae=False, cache_compression_vae=True, mini_batch_encoder=8, mini_batch_decoder=2)
    assert VAEConfig.from_dict(v4) == replace(VAE_V4, scaling_factor=0.7125)
    with pytest.raises(ValueError, match="only cache_mag_vae"):
        VAEConfig.from_dict(dict(v4, cache_compression_vae=False, slice_mag_vae=True))


def test_every_layer_comes_from_the_injected_operations():
    made = []

    def recording(base):
        def __init__(self, *args, **kwargs):
            base.__init__(self, *args, **kwargs)
            made.append(self)

        return type(base.__name__, (base,), {"__init__": __init__})

    class Ops:
        Conv3d = recording(torch.nn.Conv3d)
        GroupNorm = recording(torch.nn.GroupNorm)
        Linear = recording(torch.nn.Linear)

    vae = MagvitVAE(TINY_V5, operations=Ops, dtype=torch.float64)
    with_params = [m for m in vae.modules() if list(m.parameters(recurse=False))]
    assert with_params and all(any(m is x for x in made) for m in with_params)
    assert all(p.dtype == torch.float64 for p in vae.parameters())
    out = vae.decode(latents(2).double())
    assert out.shape == (1, 3, 5, 16, 16) and torch.isfinite(out).all()
