"""The V2 ("v2-magvit") and V3 ("v3-slice") VAE paths against the official code, and their detection.

Reference: the official ``AutoencoderKLMagvit`` (easyanimate/models/autoencoder_magvit.py) of the V3 release
(f9eeabe) and of V2 (fb0916f), driven the way the official pipelines drive it: the chunked encode loop of
``prepare_latents`` / ``prepare_mask_latents`` (reproduced here, five lines) and the pipelines' own
``decode_latents`` and ``smooth_output`` methods, taken from the official pipeline file and called on a stub
object that holds the official VAE (V3: pipeline_easyanimate_inpaint.py, V2: pipeline_easyanimate.py).
With EASYANIMATE_OFFICIAL_V3_PATH / EASYANIMATE_OFFICIAL_V2_PATH set (an extracted checkout, the directory
holding ``easyanimate/``) the official code runs live; otherwise the outputs bench/official_v2v3_vae.py
stored in tests/data/v2v3_vae_reference.npz are the reference. Bound: max|ours - official| <= 1e-5 *
max|official| in float32.

``smooth_output`` re-encodes with ``posterior.sample()`` (the global RNG): the "sample" cases seed the global
RNG for the official call and pass a generator with the same seed to ours; the "mean" cases replace the
official ``sample`` by the posterior mean, which is what ``decode`` does without a generator.
"""

from __future__ import annotations

import ast
import gzip
import importlib
import json
import math
import os
import sys
import types
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from easyanimate_core.loading import VAE_TRAINING_LOSS_TENSORS, inspect_checkpoint, load_vae
from easyanimate_core.vae import VAE_V2, VAE_V3, VAE_V4, VAE_V51, MagvitVAE, VAEConfig
from tests.manifest import MANIFEST_PATH
from tests.official_code import install_official_packages
from tests.vae_fixtures import rel_diff

REFERENCE = Path(__file__).resolve().parent / "data" / "v2v3_vae_reference.npz"
KEYS = MANIFEST_PATH.with_name("official_v2v3_vae_keys.tsv.gz")
OFFICIAL = {"v3": os.environ.get("EASYANIMATE_OFFICIAL_V3_PATH"), "v2": os.environ.get("EASYANIMATE_OFFICIAL_V2_PATH")}
PIPELINE_FILE = {
    "v3": "easyanimate/pipeline/pipeline_easyanimate_inpaint.py",
    "v2": "easyanimate/pipeline/pipeline_easyanimate.py",
}

# Official constructor arguments: the released block types, 3d mid attention, tiny widths (8, 16, 32, 32).
_TINY = dict(
    ch=8,
    ch_mult=[1, 2, 4, 4],
    latent_channels=4,
    norm_num_groups=4,
    layers_per_block=2,  # one mid-block attention between the two mid resnets
    mid_block_use_attention=True,
    mid_block_attention_type="3d",
    down_block_types=["SpatialDownBlock3D"] + ["SpatialTemporalDownBlock3D"] * 3,
    up_block_types=["SpatialUpBlock3D"] + ["SpatialTemporalUpBlock3D"] * 3,
)
TINY = {
    "v3": dict(_TINY, slice_compression_vae=True, mini_batch_encoder=8, mini_batch_decoder=2),
    "v2": dict(_TINY, slice_compression_vae=False, mini_batch_encoder=9, mini_batch_decoder=3),
}
SEED = {"v3": 11, "v2": 12}
HEIGHT, WIDTH = 8, 16  # one by two latent pixels: spatial borders and "3d" attention over t*2 tokens
# (name, release, what, frames or latent frames, smoothing): "mean" / "sample" / "off"
CASES = [
    ("v3_encode_24", "v3", "encode", 24, None),
    ("v3_encode_1", "v3", "encode", 1, None),
    ("v3_decode_6_sample", "v3", "decode", 6, "sample"),  # middle pair has both neighbours; 16 frames re-encoded
    ("v3_decode_5_mean", "v3", "decode", 5, "mean"),  # latent 0 alone, then pairs; 9 frames re-encoded
    ("v3_decode_2_off", "v3", "decode", 2, "off"),
    ("v3_decode_1_mean", "v3", "decode", 1, "mean"),  # one frame: nothing to smooth
    ("v2_encode_27", "v2", "encode", 27, None),
    ("v2_encode_1", "v2", "encode", 1, None),
    ("v2_decode_9_sample", "v2", "decode", 9, "sample"),  # three independent chunks; 18 frames re-encoded
    ("v2_decode_6_mean", "v2", "decode", 6, "mean"),
    ("v2_decode_3_off", "v2", "decode", 3, "off"),
    ("v2_decode_1_mean", "v2", "decode", 1, "mean"),
]
SAMPLE_SEED = 5


def inputs(release: str, what: str, n: int) -> torch.Tensor:
    """A seeded video [1,3,n,8,16] in [-1,1] (encode) or DiT-scale latents [1,4,n,1,2] (decode)."""
    g = torch.Generator().manual_seed(100 + n)
    if what == "encode":
        return torch.rand(1, 3, n, HEIGHT, WIDTH, generator=g) * 2 - 1
    return torch.randn(1, 4, n, HEIGHT // 8, WIDTH // 8, generator=g) * 0.5  # ~ scaling_factor * posterior mean


def seeded_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Reproducible weights by key name (one generator per key, in sorted order: construction order is free).

    Fan-in scaled kernels and near-1 norm scales keep activations O(1), so the decoded video is not all clamped.
    """
    out = {}
    for i, (key, value) in enumerate(sorted(model.state_dict().items())):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        noise = torch.randn(value.shape, generator=g)
        if value.ndim >= 2:  # conv / linear kernels
            out[key] = noise / value[0].numel() ** 0.5
        elif key.endswith("weight"):  # GroupNorm scales
            out[key] = 1 + 0.1 * noise
        else:
            out[key] = 0.05 * noise
    return out


# ------------------------------------------------------------------------------------------------ official


@contextmanager
def official_modules(root: str):
    """Import official modules from ``root`` (tests/official_code.py); its easyanimate.* modules are dropped after."""
    saved = {name: m for name, m in sys.modules.items() if name == "easyanimate" or name.startswith("easyanimate.")}
    try:
        install_official_packages(root)
        yield
    finally:
        for name in [n for n in sys.modules if n == "easyanimate" or n.startswith("easyanimate.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def official_vae(release: str, root: str) -> torch.nn.Module:
    """The official AutoencoderKLMagvit of ``root`` with the tiny config and seeded weights."""
    if not (Path(root) / "easyanimate/models/autoencoder_magvit.py").is_file():
        pytest.fail(f"{root} has no easyanimate/models/autoencoder_magvit.py")
    with official_modules(root):
        cls = importlib.import_module("easyanimate.models.autoencoder_magvit").AutoencoderKLMagvit
    model = cls(**TINY[release]).eval()
    model.load_state_dict(seeded_weights(model, SEED[release]), strict=True)
    return model


def pipeline_methods(root: str, release: str, vae: torch.nn.Module) -> types.SimpleNamespace:
    """A stub pipeline holding ``vae`` whose decode_latents / smooth_output are the official pipeline's own."""
    source = (Path(root) / PIPELINE_FILE[release]).read_text()
    wanted = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name in ("decode_latents", "smooth_output")
    ]
    namespace = {"torch": torch, "rearrange": importlib.import_module("einops").rearrange, "tqdm": lambda x: x}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), PIPELINE_FILE[release], "exec"), namespace)
    stub = types.SimpleNamespace(vae=vae)
    stub.decode_latents = types.MethodType(namespace["decode_latents"], stub)
    stub.smooth_output = types.MethodType(namespace["smooth_output"], stub)
    return stub


def official_encode(vae, video: torch.Tensor) -> torch.Tensor:
    """The pipelines' encode loop (prepare_latents): one call (slice VAE) or one per mini_batch_encoder frames."""
    m = vae.mini_batch_encoder
    chunks = [video] if vae.slice_compression_vae else [video[:, :, j : j + m] for j in range(0, video.shape[2], m)]
    posteriors = [vae.encode(chunk)[0] for chunk in chunks]
    mean = torch.cat([p.mean for p in posteriors], dim=2)
    logvar = torch.cat([p.logvar for p in posteriors], dim=2)
    return torch.stack([mean, logvar])


def official_decode(stub, latents: torch.Tensor, smoothing: str, monkeypatch) -> torch.Tensor:
    """The official decode_latents: [0, 1] video as the pipeline returns it (before its numpy conversion)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if smoothing == "off":
        stub.smooth_output = lambda video, *_: video
    elif smoothing == "mean":
        monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    torch.manual_seed(SAMPLE_SEED)
    return torch.from_numpy(stub.decode_latents(latents))


def official_output(name: str, monkeypatch) -> torch.Tensor:
    _, release, what, n, smoothing = next(c for c in CASES if c[0] == name)
    vae = official_vae(release, OFFICIAL[release])
    x = inputs(release, what, n)
    with torch.no_grad():
        if what == "encode":
            return official_encode(vae, x)
        return official_decode(pipeline_methods(OFFICIAL[release], release, vae), x, smoothing, monkeypatch)


# ------------------------------------------------------------------------------------------------ ours


def ours_vae(release: str) -> MagvitVAE:
    """Our VAE from the official tiny config, with the same seeded weights as the official one."""
    # pixel_multiple 8: the VAE's own compression (16 is the DiT's patch), so 8-pixel-high test videos pass
    model = MagvitVAE(replace(VAEConfig.from_dict(TINY[release]), pixel_multiple=8)).eval()
    model.load_state_dict(seeded_weights(model, SEED[release]), strict=True)
    return model


def ours_output(name: str) -> torch.Tensor:
    _, release, what, n, smoothing = next(c for c in CASES if c[0] == name)
    vae = ours_vae(release)
    x = inputs(release, what, n)
    if what == "encode":
        return torch.stack(vae.encode(x))
    # The official decode_latents starts with `latents = 1 / scaling_factor * latents` (V2: 1 / 0.18215).
    z = 1 / vae.config.scaling_factor * x
    generator = torch.Generator().manual_seed(SAMPLE_SEED) if smoothing == "sample" else None
    video = vae.decode(z, smooth=smoothing != "off", smooth_generator=generator)
    return (video / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_matches_committed_official_outputs(name):
    expected = torch.from_numpy(np.load(REFERENCE)[name])
    assert rel_diff(ours_output(name), expected) <= 1e-5


@pytest.mark.parametrize("name", [c[0] for c in CASES if c[1] == "v3"])
@pytest.mark.skipif(not OFFICIAL["v3"], reason="set EASYANIMATE_OFFICIAL_V3_PATH")
def test_v3_matches_official_v3_release(name, monkeypatch):
    assert rel_diff(ours_output(name), official_output(name, monkeypatch)) <= 1e-5


@pytest.mark.parametrize("name", [c[0] for c in CASES if c[1] == "v2"])
@pytest.mark.skipif(not OFFICIAL["v2"], reason="set EASYANIMATE_OFFICIAL_V2_PATH")
def test_v2_matches_official_v2_release(name, monkeypatch):
    assert rel_diff(ours_output(name), official_output(name, monkeypatch)) <= 1e-5


def test_reference_outputs_are_live():
    """The committed decodes are not clamp-saturated, and sampling and smoothing each change the output."""
    ref = np.load(REFERENCE)
    for name in ("v3_decode_6_sample", "v3_decode_5_mean", "v2_decode_9_sample", "v2_decode_6_mean"):
        inside = ((ref[name] > 0.001) & (ref[name] < 0.999)).mean()
        assert inside > 0.8, (name, inside)
    vae = ours_vae("v3")
    z = 1 / vae.config.scaling_factor * inputs("v3", "decode", 6)
    mean = vae.decode(z)
    sampled = vae.decode(z, smooth_generator=torch.Generator().manual_seed(SAMPLE_SEED))
    plain = vae.decode(z, smooth=False)
    assert rel_diff(sampled, mean) > 1e-2 and rel_diff(plain, mean) > 1e-2
    assert torch.equal(mean[:, :, :4], plain[:, :, :4])  # smooth_output leaves the first half chunk alone


# ------------------------------------------------------------------------------------------------ temporal behaviour


def test_v3_decoder_pairs_see_their_neighbours_and_v2_chunks_do_not():
    v3, v2 = ours_vae("v3"), ours_vae("v2")
    z3 = inputs("v3", "decode", 6)
    changed = z3.clone()
    changed[:, :, 4:] += 1.0  # the third pair only
    a, b = v3.decode(z3, smooth=False), v3.decode(changed, smooth=False)
    assert torch.equal(a[:, :, :8], b[:, :, :8])  # pair 1 does not see pair 3
    assert rel_diff(a[:, :, 8:16], b[:, :, 8:16]) > 1e-3  # pair 2's conv_in / mid block see pair 3
    z2 = inputs("v2", "decode", 6)
    changed = z2.clone()
    changed[:, :, 3:] += 1.0  # the second chunk only
    a, b = v2.decode(z2, smooth=False), v2.decode(changed, smooth=False)
    assert torch.equal(a[:, :, :9], b[:, :, :9])  # independent calls
    assert not torch.equal(v2.decode(z2)[:, :, :9], v2.decode(changed)[:, :, :9])  # smoothing bridges them


def test_frame_rules_match_the_official_pipelines():
    # prepare_latents: video_length // mini_batch_encoder * mini_batch_decoder latents (1 for one frame)
    for cfg, lengths in ((VAE_V2, (1, 9, 18, 144)), (VAE_V3, (1, 8, 16, 144))):
        for f in lengths:
            latents = 1 if f == 1 else f // cfg.mini_batch_encoder * cfg.mini_batch_decoder
            assert (cfg.latent_frames(f), cfg.video_frames(latents)) == (latents, f)
    assert [VAE_V2.nearest_frames(f) for f in (1, 8, 9, 20, 144)] == [
        (1, "1 or a multiple of 9"),
        (1, "1 or a multiple of 9"),
        (9, "1 or a multiple of 9"),
        (18, "1 or a multiple of 9"),
        (144, "1 or a multiple of 9"),
    ]
    assert [VAE_V3.nearest_frames(f)[0] for f in (1, 7, 8, 150)] == [1, 1, 8, 144]
    assert [VAE_V4.nearest_frames(f)[0] for f in (1, 7, 8, 17)] == [1, 1, 8, 16]
    assert VAE_V51.nearest_frames(10) == (9, "4k+1") and VAE_V51.nearest_frames(0)[0] == 1
    # the tiny models make exactly these shapes
    assert ours_vae("v2").encode(inputs("v2", "encode", 18))[0].shape[2] == VAE_V2.latent_frames(18) == 6
    assert ours_vae("v3").decode(inputs("v3", "decode", 5)).shape[2] == VAE_V3.video_frames(5) == 17
    with pytest.raises(ValueError, match="multiple of 9 frames"):
        ours_vae("v2").encode(inputs("v2", "encode", 10))


def test_latent_counts_that_smooth_output_cannot_handle_are_refused():
    """With the released chunk sizes every count smooths; with others the middle may not re-decode to its length
    (the official pipeline then fails assigning it back)."""
    vae = MagvitVAE(replace(ours_vae("v2").config, mini_batch_encoder=3, mini_batch_decoder=1)).eval()
    z = inputs("v2", "decode", 5)  # 5 frames; the middle 2 re-encode to 1 latent, which decodes to 1 frame
    with pytest.raises(ValueError, match="smooth=False"):
        vae.decode(z)
    assert vae.decode(z, smooth=False).shape[2] == 5


# ------------------------------------------------------------------------------------------------ config and keys


def _released_config(release: str) -> dict:
    """A vae/config.json as the V2/V3-era class saves it (every constructor argument), with tiny widths."""
    keys = ("ch", "ch_mult", "latent_channels", "norm_num_groups", "layers_per_block", "down_block_types")
    config = {k: TINY[release][k] for k in keys}
    config.update(
        _class_name="AutoencoderKLMagvit",
        in_channels=3,
        out_channels=3,
        use_gc_blocks=None,
        up_block_types=TINY[release]["up_block_types"],
        mid_block_type="MidBlock3D",
        mid_block_use_attention=True,
        mid_block_attention_type="3d",
        mid_block_num_attention_heads=1,
        act_fn="silu",
        num_attention_heads=1,
        scaling_factor=0.1825,
        slice_compression_vae=release == "v3",
        use_tiling=False,
        mini_batch_encoder=TINY[release]["mini_batch_encoder"],
        mini_batch_decoder=TINY[release]["mini_batch_decoder"],
    )
    return config


def test_config_from_the_v2_v3_era_class():
    tiny = dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=4)
    assert VAEConfig.from_dict(_released_config("v3")) == replace(VAE_V3, **tiny)
    # V2's pipeline and trainer use 0.18215 whatever the config says
    assert VAEConfig.from_dict(_released_config("v2")) == replace(VAE_V2, **tiny)
    assert VAE_V3.scaling_factor == 0.1825 and VAE_V2.scaling_factor == 0.18215


def _manifest(model_id: str) -> tuple[dict[str, tuple], set[str]]:
    rows = [line.split("\t") for line in gzip.open(KEYS, "rt").read().splitlines() if line.startswith(model_id)]
    return {key: tuple(ast.literal_eval(shape)) for _, key, shape, _ in rows}, {r[1] for r in rows if r[3]}


@pytest.mark.parametrize(("model_id", "preset"), [("vae_v3", VAE_V3), ("vae_v2", VAE_V2)])
def test_keys_plus_the_listed_training_tensors_equal_the_official_manifest(model_id, preset):
    expected, noted = _manifest(model_id)
    vae = MagvitVAE(preset, device="meta")
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()} | VAE_TRAINING_LOSS_TENSORS
    assert ours == expected
    assert noted == set(VAE_TRAINING_LOSS_TENSORS) and len(noted) == 96  # the public load log's count
    graph = sum(math.prod(s) for k, s in expected.items() if k not in noted)
    assert 0.08 < sum(math.prod(s) for s in VAE_TRAINING_LOSS_TENSORS.values()) / graph < 0.09


# ------------------------------------------------------------------------------------------------ detection


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], zeros: dict[str, tuple] = ()) -> None:
    """A safetensors file of ``tensors`` plus F32 all-zero ``zeros`` stored as a sparse tail (no disk, no RAM)."""
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    for name, shape in dict(zeros).items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + b"".join(chunks))
        f.truncate(8 + len(raw) + offset)


def _header_only(folder: Path, preset: VAEConfig, loss: bool, config: dict | None) -> Path:
    folder.mkdir(parents=True)
    shapes = {k: tuple(v.shape) for k, v in MagvitVAE(preset, device="meta").state_dict().items()}
    write_safetensors(
        folder / "diffusion_pytorch_model.safetensors", {}, {**shapes, **(VAE_TRAINING_LOSS_TENSORS if loss else {})}
    )
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


V4_CONFIG = dict(cache_compression_vae=True, cache_mag_vae=False, slice_compression_vae=False, slice_mag_vae=False)


@pytest.mark.parametrize(
    ("preset", "loss", "config", "version", "mode"),
    [
        (VAE_V3, True, None, "V3", "v3-slice"),  # released file, no config.json: the later release
        (VAE_V3, True, {"slice_compression_vae": True, "mini_batch_encoder": 8}, "V3", "v3-slice"),
        (VAE_V2, True, {"slice_compression_vae": False, "mini_batch_encoder": 9}, "V2", "v2-magvit"),
        (VAE_V3, False, {"slice_compression_vae": True}, "V3", "v3-slice"),  # re-saved without the loss tensors
        (VAE_V2, False, {"slice_compression_vae": False, "mini_batch_decoder": 3}, "V2", "v2-magvit"),
        (VAE_V4, False, None, "V4", "slice"),
        (VAE_V4, False, V4_CONFIG, "V4", "slice"),
    ],
)
def test_detection(tmp_path, preset, loss, config, version, mode):
    info = inspect_checkpoint(_header_only(tmp_path / "vae", preset, loss, config), "vae")
    assert (info.version, info.variant, info.config.temporal_mode) == (version, mode, mode)
    assert (info.config.mini_batch_encoder, info.config.mini_batch_decoder) == (
        {"V2": 9}.get(version, 8),
        {"V2": 3}.get(version, 2),
    )
    assert info.config.scaling_factor == (0.18215 if version == "V2" else 0.1825)
    assert sorted(info.ignored) == (sorted(VAE_TRAINING_LOSS_TENSORS) if loss else [])
    assert info.num_params == sum(v.numel() for v in MagvitVAE(preset, device="meta").state_dict().values())


def test_detection_refuses_contradictions(tmp_path):
    with pytest.raises(ValueError, match="names the slice chunking"):
        inspect_checkpoint(_header_only(tmp_path / "a", VAE_V3, True, V4_CONFIG), "vae")
    folder = _header_only(tmp_path / "b", VAE_V3, False, None)
    shapes = {k: tuple(v.shape) for k, v in MagvitVAE(VAE_V3, device="meta").state_dict().items()}
    wrong = {**shapes, **VAE_TRAINING_LOSS_TENSORS, "loss.logvar": (2,), "loss.discriminator.extra": (3,)}
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", {}, wrong)
    with pytest.raises(ValueError, match="loss.* tensor"):
        inspect_checkpoint(folder, "vae")


def test_load_vae_round_trip_skips_the_training_tensors(tmp_path):
    vae = ours_vae("v3")
    folder = tmp_path / "model" / "vae"
    folder.mkdir(parents=True)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", vae.state_dict(), VAE_TRAINING_LOSS_TENSORS)
    (folder / "config.json").write_text(json.dumps(_released_config("v3")))
    loaded = load_vae(tmp_path / "model")
    assert (loaded.info.version, loaded.config.temporal_mode, len(loaded.info.ignored)) == ("V3", "v3-slice", 96)
    assert replace(loaded.config, pixel_multiple=8) == vae.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in vae.state_dict().items())
    z = inputs("v3", "decode", 4)
    assert torch.equal(loaded.decode(z), vae.decode(z))
