"""Optional parity with the official EasyAnimate V4 transformer (``HunyuanTransformer3DModel``).

The official code is the only reference for V4 (diffusers has no port). It is not a dependency: point
``EASYANIMATE_OFFICIAL_PATH`` at an extracted checkout of aigc-apps/EasyAnimate (the directory that contains
``easyanimate/``) to run these tests; they are skipped otherwise. Only ``easyanimate/models`` is imported,
with stub parent packages (and a ``pkg_resources`` stand-in where setuptools no longer ships it); diffusers
is needed. The slice VAE's parity is tests/test_vae_official.py.

Both block-0 RoPE behaviours are compared: the checkout's own (HEAD turns RoPE off in block 0's
self-attention) and the V4-era one (on everywhere, our default), by calling the official block 0 with the
flag cleared. Bound: max|ours - official| <= 1e-5 * max|official| in float32.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from easyanimate_core.transformer_v4 import EasyAnimateV4Transformer3D, TransformerV4Config

OFFICIAL = os.environ.get("EASYANIMATE_OFFICIAL_PATH")
pytestmark = pytest.mark.skipif(
    not OFFICIAL, reason="set EASYANIMATE_OFFICIAL_PATH to an extracted official EasyAnimate checkout to run"
)

# A tiny V4 geometry with every part of the released one: long skips (6 layers: 0, 1 push; 4, 5 pop),
# the CLIP branch with a kv projection (projection_dim != cross_attention_dim) or without one, the
# temporal table, a non-square token grid (RoPE crop start != 0).
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    hidden_size=32,
    in_channels=12,
    out_channels=8,
    patch_size=2,
    num_layers=6,
    mlp_ratio=2.0,
    learn_sigma=True,
    cross_attention_dim=24,
    cross_attention_dim_t5=16,
    pooled_projection_dim=12,
    text_len=5,
    text_len_t5=7,
    n_query=4,
    projection_dim=20,
    sample_size=8,
    basic_block_type="basic",
    time_position_encoding=True,
    after_norm=False,
    enable_clip_in_inpaint=True,
)
CLIP_TOKENS = 16  # a 4x4 patch grid: the resampler's 2x2 key positions are resized to it


def official_class():
    """The official HunyuanTransformer3DModel, imported without running easyanimate/__init__.py."""
    root = Path(OFFICIAL).resolve()
    if not (root / "easyanimate" / "models" / "transformer3d.py").is_file():
        pytest.fail(f"EASYANIMATE_OFFICIAL_PATH={OFFICIAL} has no easyanimate/models/transformer3d.py")
    try:
        import pkg_resources  # noqa: F401  (the official attention module imports it for a version check)
    except ImportError:
        from packaging.version import parse

        stub = types.ModuleType("pkg_resources")
        stub.parse_version = parse
        sys.modules["pkg_resources"] = stub
    for name, path in (("easyanimate", root / "easyanimate"), ("easyanimate.models", root / "easyanimate/models")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    return importlib.import_module("easyanimate.models.transformer3d").HunyuanTransformer3DModel


def head_disables_block0_rope(ref) -> bool:
    """Whether the checkout's model turns RoPE off in block 0's self-attention (HEAD since V5; not V4-era)."""
    return "disable_image_rotary_emb_in_attn1" in inspect.signature(ref.blocks[0].forward).parameters


def with_block0_rope(ref):
    """The official model with RoPE forced on in block 0's self-attention (the V4-era code)."""
    block = ref.blocks[0]
    original = block.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        kwargs["disable_image_rotary_emb_in_attn1"] = False
        return original(*args, **kwargs)

    block.forward = forward
    return ref


def build_pair(config: dict, seed: int, rope_in_first_block: bool):
    torch.manual_seed(seed)
    cls = official_class()
    accepted = inspect.signature(cls.__init__).parameters  # the V4-era class lacks the later switches
    ref = cls(**{k: v for k, v in config.items() if k in accepted}).eval()
    with torch.no_grad():  # give every weight (zero-initialised ones included) a visible value
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if rope_in_first_block and head_disables_block0_rope(ref):
        with_block0_rope(ref)
    ours = EasyAnimateV4Transformer3D(
        TransformerV4Config.from_dict(config).replace(rope_in_first_block=rope_in_first_block)
    ).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg: dict, frames: int, seed: int = 1, h: int = 8, w: int = 12):
    g = torch.Generator().manual_seed(seed)
    b = 2
    text_mask = torch.ones(b, cfg["text_len"], dtype=torch.long)
    text_mask[0, 3:] = 0
    t5_mask = torch.ones(b, cfg["text_len_t5"], dtype=torch.long)
    t5_mask[1, 4:] = 0
    clip_mask = torch.tensor([[0.0] * cfg["n_query"], [1.0] * cfg["n_query"]])  # [uncond ; cond] as in CFG
    return dict(
        hidden_states=torch.randn(b, 4, frames, h, w, generator=g),
        timestep=torch.tensor([999.0, 37.5]),
        encoder_hidden_states=torch.randn(b, cfg["text_len"], cfg["cross_attention_dim"], generator=g),
        text_embedding_mask=text_mask,
        encoder_hidden_states_t5=torch.randn(b, cfg["text_len_t5"], cfg["cross_attention_dim_t5"], generator=g),
        text_embedding_mask_t5=t5_mask,
        image_meta_size=torch.tensor([[1024.0, 1024.0, h * 8, w * 8, 0, 0]] * b),
        style=torch.zeros(b, dtype=torch.long),
        inpaint_latents=torch.randn(b, 8, frames, h, w, generator=g),
        clip_encoder_hidden_states=torch.randn(b, CLIP_TOKENS, cfg["projection_dim"], generator=g),
        clip_attention_mask=clip_mask,
    )


def run_both(ref, ours, kw: dict):
    h, w = kw["hidden_states"].shape[-2:]
    rope = ours.rope(h // 2, w // 2, 1, "cpu")  # one frame: the official blocks tile it themselves
    with torch.no_grad():
        expected = ref(**kw, image_rotary_emb=rope, return_dict=False)[0]
        actual = ours(**kw)
    return actual, expected


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("rope_in_first_block", [True, False], ids=["v4_era_block0_rope", "head_no_block0_rope"])
@pytest.mark.parametrize("frames", [1, 4])
def test_v4_transformer_matches_official(rope_in_first_block, frames):
    ref, ours = build_pair(TINY, seed=3, rope_in_first_block=rope_in_first_block)
    if not rope_in_first_block and not head_disables_block0_rope(ref):
        pytest.skip("this official checkout is V4-era: it has no block-0 RoPE flag to compare against")
    actual, expected = run_both(ref, ours, inputs(TINY, frames))
    assert actual.shape == expected.shape == (2, 8, frames, 8, 12)
    assert rel(actual, expected) <= 1e-5


def test_v4_transformer_without_kv_projection_matches_official():
    config = dict(TINY, projection_dim=TINY["cross_attention_dim"])  # the released geometry: no kv_proj
    ref, ours = build_pair(config, seed=4, rope_in_first_block=True)
    assert ours.clip_projection.kv_proj is None
    actual, expected = run_both(ref, ours, inputs(config, 2))
    assert rel(actual, expected) <= 1e-5


def test_missing_clip_features_equal_zero_features_with_mask_zero():
    """Our shortcut (no features -> learned padding) is the official zeros + mask 0 path."""
    ref, ours = build_pair(TINY, seed=5, rope_in_first_block=True)
    kw = inputs(TINY, 2)
    kw["clip_encoder_hidden_states"] = torch.zeros_like(kw["clip_encoder_hidden_states"])
    kw["clip_attention_mask"] = torch.zeros_like(kw["clip_attention_mask"])
    _, expected = run_both(ref, ours, kw)
    with torch.no_grad():
        actual = ours(**{**kw, "clip_encoder_hidden_states": None, "clip_attention_mask": None})
    assert rel(actual, expected) <= 1e-5


def test_block0_rope_switch_matters():
    """The two behaviours differ visibly, so the parity tests above tell them apart."""
    _, ours = build_pair(TINY, seed=3, rope_in_first_block=True)
    kw = inputs(TINY, 2)
    with torch.no_grad():
        on = ours(**kw)
        ours.config = ours.config.replace(rope_in_first_block=False)
        off = ours(**kw)
    assert rel(off, on) > 1e-3
