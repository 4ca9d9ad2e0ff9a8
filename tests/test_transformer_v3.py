"""The V1 / V2 / V3 transformer (PixArt-alpha + motion modules): parity with the official ``Transformer3DModel``.

Reference: aigc-apps/EasyAnimate at f9eeabe (the V3 release; V2 at fb0916f). Point ``EASYANIMATE_OFFICIAL_V3_PATH``
(and optionally ``EASYANIMATE_OFFICIAL_V2_PATH``) at an extracted checkout of that commit (the directory holding
``easyanimate/``) to compare against the official class directly; otherwise the forward outputs it produced are
read from tests/data/v3_reference.npz (written by bench/official_v3.py from the same tiny configurations, the same
seeded weights and inputs). Key manifests of the released configurations: tests/data/official_v3_keys.tsv.gz.
Bound: max|ours - official| <= 1e-5 * max|official| in float32.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from easyanimate_core.transformer_v3 import (
    V1_XL,
    V2_XL,
    V3_XL_INP,
    EasyAnimateV3Transformer3D,
    TransformerV3Config,
    config_from_state_dict,
    temporal_table,
)
from tests.manifest import manifest
from tests.official_code import official_module

REFERENCE = Path(__file__).resolve().parent / "data" / "v3_reference.npz"


def _motion(heads: int, kinds: list[str], block_size: int = 1) -> dict:
    return dict(
        num_attention_heads=heads,
        num_transformer_block=1,
        attention_block_types=kinds,
        temporal_position_encoding=True,
        temporal_position_encoding_max_len=4096,
        temporal_attention_dim_div=1,
        block_size=block_size,
    )


# Tiny geometries with every part of the released ones: 28 blocks (all 13 long skips), the CLIP projection,
# masks, a token grid other than the sample_size one (the sin-cos table is rescaled), distinct motion heads.
_PIXART = dict(
    num_attention_heads=2, attention_head_dim=16, out_channels=8, num_layers=28, patch_size=2, sample_size=8,
    caption_channels=24, cross_attention_dim=32, norm_type="ada_norm_single", norm_elementwise_affine=False,
    norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
)  # fmt: skip
TINY = {
    "v3": dict(
        _PIXART, in_channels=12, basic_block_type="global_motionmodule", motion_module_type="Vanilla",
        enable_uvit=True, motion_module_kwargs_even=_motion(2, ["Temporal_Self", "Temporal_Self"]),
        motion_module_kwargs_odd=_motion(4, ["Temporal_Self", "Global_Self"]),
    ),
    "v2": dict(
        _PIXART, in_channels=4, basic_block_type="motionmodule", motion_module_type="Vanilla", enable_uvit=True,
        motion_module_kwargs=_motion(2, ["Temporal_Self", "Temporal_Self"]),
    ),
    "v1": dict(
        _PIXART, in_channels=4, basic_block_type="motionmodule", motion_module_type="VanillaGrid",
        motion_module_kwargs=_motion(2, ["Temporal_Self", "Temporal_Self"], block_size=2),
    ),
}  # fmt: skip
GRID = {"v3": (4, 6), "v2": (4, 6), "v1": (8, 12)}  # latent H, W (V1's 2x2 windows need H/2, W/2 even)


def seeded_weights(model: torch.nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """A state dict of reproducible random values (one CPU generator per key, in key order); frame tables kept."""
    out = {}
    for i, (key, value) in enumerate(model.state_dict().items()):
        if key.endswith("pos_encoder.pe"):
            out[key] = value
            continue
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        out[key] = torch.randn(value.shape, generator=g) * 0.1
    return out


def tiny_inputs(variant: str, seed: int = 1) -> dict[str, torch.Tensor]:
    cfg = TINY[variant]
    h, w = GRID[variant]
    g = torch.Generator().manual_seed(seed)
    b, f = 2, 3
    mask = torch.ones(b, 7)
    mask[0, 4:] = 0
    kw = dict(
        hidden_states=torch.randn(b, 4, f, h, w, generator=g),
        timestep=torch.tensor([999, 37]),
        encoder_hidden_states=torch.randn(b, 7, cfg["caption_channels"], generator=g),
        encoder_attention_mask=mask,
    )
    if cfg["in_channels"] == 12:
        kw["inpaint_latents"] = torch.randn(b, 8, f, h, w, generator=g)
        kw["clip_encoder_hidden_states"] = torch.randn(b, 768, generator=g)
        kw["clip_attention_mask"] = torch.tensor([[0.0] * 8, [1.0] * 8])  # [uncond ; cond] as the pipeline feeds
    return kw


def ours_for(variant: str) -> EasyAnimateV3Transformer3D:
    model = EasyAnimateV3Transformer3D(TransformerV3Config.from_dict(TINY[variant])).eval()
    model.load_state_dict(seeded_weights(model), strict=True)
    return model


def official_class(root: str):
    """The official Transformer3DModel of a V1-V3-era checkout."""
    return official_module(root, "easyanimate.models.transformer3d").Transformer3DModel


def official_forward(cls, variant: str) -> torch.Tensor:
    """The official model's output on the tiny config, the seeded weights and the tiny inputs."""
    accepted = inspect.signature(cls.__init__).parameters  # the V2-era class lacks the even/odd switches
    ref = cls(**{k: v for k, v in TINY[variant].items() if k in accepted}).eval()
    ref.load_state_dict(seeded_weights(ref), strict=True)
    kw = dict(tiny_inputs(variant), added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    taken = inspect.signature(ref.forward).parameters
    with torch.no_grad():
        return ref(**{k: v for k, v in kw.items() if k in taken})[0]


def ours_forward(variant: str) -> torch.Tensor:
    with torch.no_grad():
        return ours_for(variant)(**tiny_inputs(variant))


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("variant", ["v3", "v2", "v1"])
def test_matches_committed_official_outputs(variant):
    expected = torch.from_numpy(np.load(REFERENCE)[variant])
    actual = ours_forward(variant)
    assert actual.shape == expected.shape
    assert rel(actual, expected) <= 1e-5


@pytest.mark.skipif(not os.environ.get("EASYANIMATE_OFFICIAL_V3_PATH"), reason="set EASYANIMATE_OFFICIAL_V3_PATH")
@pytest.mark.parametrize("variant", ["v3", "v2", "v1"])
def test_matches_official_v3_era_class(variant):
    expected = official_forward(official_class(os.environ["EASYANIMATE_OFFICIAL_V3_PATH"]), variant)
    assert rel(ours_forward(variant), expected) <= 1e-5


@pytest.mark.skipif(not os.environ.get("EASYANIMATE_OFFICIAL_V2_PATH"), reason="set EASYANIMATE_OFFICIAL_V2_PATH")
def test_v2_matches_official_v2_era_class():
    expected = official_forward(official_class(os.environ["EASYANIMATE_OFFICIAL_V2_PATH"]), "v2")
    assert rel(ours_forward("v2"), expected) <= 1e-5


def test_reference_weights_are_live():
    """The comparison sees the motion modules: perturbing one changes the output visibly."""
    model = ours_for("v3")
    kw = tiny_inputs("v3")
    with torch.no_grad():
        before = model(**kw)
        model.transformer_blocks[3].attn_temporal.temporal_transformer.proj_in.weight.add_(0.01)
        assert rel(model(**kw), before) > 1e-3


def test_masked_keys_are_ignored_like_the_official_bias():
    model = ours_for("v3")
    kw = tiny_inputs("v3")
    with torch.no_grad():
        base = model(**kw)
        kw["encoder_hidden_states"][0, 4:] += 5.0  # padding of sample 0 (mask 0): no effect
        kw["clip_encoder_hidden_states"][0] += 5.0  # sample 0's image tokens are masked: no effect
        assert rel(model(**kw)[0], base[0]) <= 1e-6


# ------------------------------------------------------------------------------------------------ manifest


@pytest.mark.parametrize(("model_id", "config"), [("v3_xl_inp", V3_XL_INP), ("v2_xl", V2_XL), ("v1_xl", V1_XL)])
def test_meta_build_of_the_released_config_matches_the_official_manifest(model_id, config):
    with torch.device("meta"):
        model = EasyAnimateV3Transformer3D(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = manifest(model_id)
    assert set(ours) ^ set(expected) == set()
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}


@pytest.mark.parametrize(("model_id", "config"), [("v3_xl_inp", V3_XL_INP), ("v2_xl", V2_XL), ("v1_xl", V1_XL)])
def test_config_is_read_from_the_released_shapes(model_id, config):
    assert config_from_state_dict(manifest(model_id)) == config


def test_frame_tables_are_the_derived_ones():
    model = EasyAnimateV3Transformer3D(TransformerV3Config.from_dict(TINY["v3"]))
    key = (
        "transformer_blocks.1.attn_temporal.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    )
    assert torch.equal(model.state_dict()[key], model.derived_tensor(key))
    assert torch.equal(model.derived_tensor(key), temporal_table(32, 4096))


def test_unsupported_official_options_are_refused():
    with pytest.raises(ValueError, match="patch_3d"):
        TransformerV3Config.from_dict(dict(TINY["v2"], patch_3d=True))
    with pytest.raises(ValueError, match="basic_block_type"):
        TransformerV3Config.from_dict(dict(TINY["v2"], basic_block_type="kvcompression_motionmodule"))
