"""The V4 transformer: the release manifest, loading and detection, RoPE tables, unpatchify, operations, checks.

Numerical parity with the official HunyuanTransformer3DModel is tests/test_v4_official.py (needs the official code).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from easyanimate_core import ops
from easyanimate_core.loading import detect_transformer, inspect_checkpoint, load_transformer
from easyanimate_core.transformer_v4 import (
    V4_XL,
    EasyAnimateV4Transformer3D,
    TransformerV4Config,
    rope_2d,
    temporal_table,
)
from tests.manifest import manifest
from tests.tiny_checkpoint import tiny_v4_config

RELEASED_PARAMS = 1_954_058_272  # spec §1.8: HunyuanDiT-g/2 geometry, buffers excluded


def tiny_model(variant: str = "InP", seed: int = 0, **overrides) -> EasyAnimateV4Transformer3D:
    torch.manual_seed(seed)
    model = EasyAnimateV4Transformer3D(tiny_v4_config(variant), **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_inputs(model: EasyAnimateV4Transformer3D, frames: int = 2, h: int = 4, w: int = 6, seed: int = 1) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, cfg.text_len, dtype=torch.long)
    mask[:, 5:] = 0
    mask_t5 = torch.ones(2, cfg.text_len_t5, dtype=torch.long)
    mask_t5[:, 9:] = 0
    kw = dict(
        hidden_states=torch.randn(2, 4, frames, h, w, generator=g),
        timestep=torch.tensor([999.0, 21.0]),
        encoder_hidden_states=torch.randn(2, cfg.text_len, cfg.cross_attention_dim, generator=g),
        encoder_hidden_states_t5=torch.randn(2, cfg.text_len_t5, cfg.cross_attention_dim_t5, generator=g),
        text_embedding_mask=mask,
        text_embedding_mask_t5=mask_t5,
    )
    if cfg.inpaint_channels:
        kw["inpaint_latents"] = torch.randn(2, cfg.inpaint_channels, frames, h, w, generator=g)
        kw["clip_encoder_hidden_states"] = torch.randn(2, 16, cfg.projection_dim, generator=g)
        kw["clip_attention_mask"] = torch.tensor([[0.0] * cfg.n_query, [1.0] * cfg.n_query])
    return kw


# ------------------------------------------------------------------------------------------------ manifest


def test_meta_build_of_the_released_config_matches_the_manifest_exactly():
    with torch.device("meta"):
        model = EasyAnimateV4Transformer3D(V4_XL)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = manifest("v4_transformer_guess")
    assert set(ours) - set(expected) == set() and set(expected) - set(ours) == set()
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}
    assert len(ours) == 2396
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS


def test_released_geometry_is_detected_from_the_manifest_shapes():
    shapes = manifest("v4_transformer_guess")
    info = detect_transformer(shapes, ["transformer.safetensors"], {})
    assert (info.version, info.variant, info.size) == ("V4", "InP", "XL")
    assert info.config == V4_XL.replace(ff_inner_dim=6144)
    assert info.num_params == RELEASED_PARAMS
    without_pe = {k: s for k, s in shapes.items() if not k.endswith(".t_embed.pe")}
    info = detect_transformer(without_pe, ["transformer.safetensors"], {})
    assert info.config.time_position_encoding and any("t_embed.pe" in note for note in info.notes)


def test_released_config_json_values_are_read_and_checked():
    shapes = manifest("v4_transformer_guess")
    config = {"mlp_ratio": 4.3637, "hidden_size": 1408, "learn_sigma": True, "time_position_encoding": False}
    info = detect_transformer(shapes, ["t.safetensors"], config)
    # The V4 yaml turns the temporal encoding on over the checkpoint's config, as the official scripts do.
    assert info.config.time_position_encoding and info.config.ff_dim == 6144
    with pytest.raises(ValueError, match="hidden_size 1024 must equal"):
        detect_transformer(shapes, ["t.safetensors"], {"hidden_size": 1024, "num_attention_heads": 16,
                                                       "attention_head_dim": 88})  # fmt: skip


# ------------------------------------------------------------------------------------------------ loading


def save_official(model: EasyAnimateV4Transformer3D, path, keep_pe: bool = True) -> dict:
    state = {k: v.contiguous() for k, v in model.state_dict().items() if keep_pe or not k.endswith("t_embed.pe")}
    save_file(state, path)
    return state


@pytest.mark.parametrize("keep_pe", [True, False], ids=["with_pe", "without_pe"])
def test_loads_official_layout_as_folder_and_single_file(tmp_path, keep_pe):
    source = tiny_model()
    folder = tmp_path / "model" / "transformer"
    folder.mkdir(parents=True)
    save_official(source, folder / "diffusion_pytorch_model.safetensors", keep_pe)
    config = {"num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 32, "mlp_ratio": 2.0}
    (folder / "config.json").write_text(json.dumps(config))
    single = tmp_path / "v4.safetensors"
    save_official(source, single, keep_pe)
    kw = tiny_inputs(source)
    with torch.no_grad():
        expected = source(**kw)
    for path in (tmp_path / "model", folder, single):
        loaded = load_transformer(path)
        assert isinstance(loaded, EasyAnimateV4Transformer3D)
        assert (loaded.info.version, loaded.info.variant) == ("V4", "InP")
        # mlp_ratio only comes from a config.json; the feed-forward width is read from the tensors.
        assert loaded.config.replace(mlp_ratio=2.0, ff_inner_dim=None) == source.config and loaded.config.ff_dim == 64
        with torch.no_grad():
            # Same weights; only memory alignment differs (read buffers), so float sums may differ in the last bit.
            assert (loaded(**kw) - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_loads_in_another_dtype_with_injected_operations(tmp_path):
    source = tiny_model()
    path = tmp_path / "v4.safetensors"
    save_official(source, path)
    model = load_transformer(path, dtype=torch.bfloat16, operations=ops.manual_cast)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, ops.CastLinear) for m in linears)
    assert model.blocks[0].t_embed.pe.dtype == torch.bfloat16
    plain = load_transformer(path, dtype=torch.bfloat16)
    kw = {k: v.bfloat16() if v.is_floating_point() else v for k, v in tiny_inputs(source).items()}
    with torch.no_grad():
        actual, expected = model(**kw), plain(**kw)
    assert actual.dtype == torch.bfloat16 and torch.equal(actual, expected)


def test_block0_rope_switch_through_the_loader(tmp_path):
    path = tmp_path / "v4.safetensors"
    save_official(tiny_model(), path)
    assert load_transformer(path).config.rope_in_first_block is True
    assert load_transformer(path, rope_in_first_block=False).config.rope_in_first_block is False


def test_missing_and_mismatched_tensors_are_named(tmp_path):
    state = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    broken = dict(state)
    del broken["blocks.1.attn2.to_k.weight"]
    save_file(broken, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 tensor.*blocks\.1\.attn2\.to_k\.weight"):
        load_transformer(tmp_path / "missing.safetensors")
    del state["pos_embed.proj.weight"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"V4 \(HunyuanDiT-based\) transformer but lacks \['pos_embed"):
        inspect_checkpoint(tmp_path / "partial.safetensors")


def test_text_to_video_geometry_has_no_clip_branch(tmp_path):
    model = tiny_model("T2V")
    assert model.clip_projection is None and model.blocks[0].attn_clip is None
    path = tmp_path / "t2v.safetensors"
    save_official(model, path)
    assert inspect_checkpoint(path).variant == "T2V"
    out = model(**tiny_inputs(model))
    assert out.shape == (2, 8, 2, 4, 6)


# ------------------------------------------------------------------------------------------------ maths


def numpy_rope(grid_h, grid_w, head_dim, base=32):
    """diffusers <= 0.31 get_2d_rotary_pos_embed (what the official code ran), in numpy."""
    r = grid_h / grid_w
    rh, rw = (base, round(base / grid_h * grid_w)) if r > 1 else (round(base / grid_w * grid_h), base)
    top, left = round((base - rh) / 2.0), round((base - rw) / 2.0)
    rows = np.linspace(top, top + rh, grid_h, endpoint=False, dtype=np.float32)
    cols = np.linspace(left, left + rw, grid_w, endpoint=False, dtype=np.float32)
    col_grid, row_grid = np.meshgrid(cols, rows)

    def axis(pos):
        freqs = 1.0 / (10000 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)))
        angles = torch.outer(torch.from_numpy(pos.reshape(-1)), freqs)
        return angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)

    (cw, sw), (ch, sh) = axis(col_grid), axis(row_grid)
    return torch.cat([cw, ch], 1), torch.cat([sw, sh], 1)


@pytest.mark.parametrize("grid", [(24, 42), (42, 24), (32, 32), (36, 64), (2, 3)])
def test_rope_tables_match_both_diffusers_generations(grid):
    pytest.importorskip("diffusers", reason="diffusers >= 0.32 is the reference (pip install -e '.[test]')")
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    from easyanimate_core.transformer import rope_grid_crop

    gh, gw = grid
    cos, sin = rope_2d(gh, gw, 88, 32, "official")
    ref_cos, ref_sin = numpy_rope(gh, gw, 88)
    assert torch.allclose(cos, ref_cos, atol=1e-6) and torch.allclose(sin, ref_sin, atol=1e-6)
    top, left, bottom, right = rope_grid_crop(gh, gw, 32, 32)
    new_cos, new_sin = get_2d_rotary_pos_embed(88, ((top, left), (bottom, right)), (gh, gw))
    cos_d, sin_d = rope_2d(gh, gw, 88, 32, "diffusers")
    assert torch.allclose(cos_d, new_cos, atol=1e-6) and torch.allclose(sin_d, new_sin, atol=1e-6)
    if gh == gw:  # the two generations only differ when the crop does not start at 0
        assert torch.equal(cos, cos_d)


def test_temporal_table_layout():
    table = temporal_table(8, 4)[0]
    assert torch.equal(table[0], torch.tensor([0.0, 1.0] * 4))  # sin(0), cos(0) interleaved
    w = torch.tensor([10000 ** (-2 * i / 8) for i in range(4)])
    assert torch.allclose(table[3, 0::2], torch.sin(3 * w)) and torch.allclose(table[3, 1::2], torch.cos(3 * w))


def test_unpatchify_is_channel_last():
    model = tiny_model("T2V")
    with torch.no_grad():
        model.proj_out.weight.zero_()
        model.proj_out.bias.copy_(torch.arange(32.0))  # value = (p * 2 + q) * 8 + c
        out = model(**tiny_inputs(model, frames=1))
    for c, p, q in ((0, 0, 0), (5, 0, 1), (3, 1, 0), (7, 1, 1)):
        assert torch.all(out[:, c, :, p::2, q::2] == (p * 2 + q) * 8 + c)


def test_temporal_encoding_makes_frames_differ():
    model = tiny_model()
    kw = tiny_inputs(model, frames=2)
    for name in ("hidden_states", "inpaint_latents"):
        kw[name] = kw[name][:, :, :1].repeat(1, 1, 2, 1, 1)  # two identical frames
    with torch.no_grad():
        out = model(**kw)
        model_no_time = EasyAnimateV4Transformer3D(model.config.replace(time_position_encoding=False)).eval()
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("t_embed.pe")}
        model_no_time.load_state_dict(state)
        flat = model_no_time(**kw)
    assert (out[:, :, 0] - out[:, :, 1]).abs().max() > 1e-3
    assert torch.allclose(flat[:, :, 0], flat[:, :, 1], atol=1e-5)


def test_text_padding_positions_use_the_learned_table():
    model = tiny_model()
    kw = tiny_inputs(model)
    changed = dict(kw)
    changed["encoder_hidden_states"] = kw["encoder_hidden_states"].clone()
    changed["encoder_hidden_states"][:, 5:] = 123.0  # only masked-out positions
    with torch.no_grad():
        assert torch.equal(model(**kw), model(**changed))
        kw["text_embedding_mask"] = torch.ones_like(kw["text_embedding_mask"])
        changed["text_embedding_mask"] = kw["text_embedding_mask"]
        assert not torch.equal(model(**kw), model(**changed))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    kw = tiny_inputs(model)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(**kw).square().mean().backward()
        grads.append(model.blocks[0].attn1.to_q.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ------------------------------------------------------------------------------------------------ checks


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda kw: kw.update(encoder_hidden_states=kw["encoder_hidden_states"][:, :70]), r"\[B, 77, 32\]"),
        (lambda kw: kw.update(encoder_hidden_states_t5=None), r"encoder_hidden_states_t5 \(mT5\) must be"),
        (lambda kw: kw.pop("inpaint_latents"), "needs inpaint_latents"),
        (lambda kw: kw.update(hidden_states=kw["hidden_states"][..., :5]), "not divisible by the patch size 2"),
        (lambda kw: kw.update(hidden_states=torch.zeros(2, 16, 2, 4, 6)), "denoises 4-channel latents"),
        (lambda kw: kw.update(clip_attention_mask=torch.ones(2, 9)), r"expected \[2, 4\]"),
        (lambda kw: kw.update(clip_encoder_hidden_states=torch.zeros(2, 15, 32)), "do not form a square grid"),
    ],
)
def test_bad_inputs_are_refused_with_the_rule(change, message):
    model = tiny_model()
    kw = tiny_inputs(model)
    change(kw)
    with pytest.raises(ValueError, match=message):
        model(**kw)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="num_layers must be even"):
        EasyAnimateV4Transformer3D(tiny_v4_config(), num_layers=5)
    with pytest.raises(ValueError, match="basic_block_type 'hybrid_attention' is not supported"):
        TransformerV4Config.from_dict({"basic_block_type": "hybrid_attention"})
