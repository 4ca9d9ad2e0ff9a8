"""The V5 / V5.1 transformer: parity with diffusers through our loaders, the release manifests,
RoPE semantics, injected operations and input validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from easyanimate_core.keys import diffusers_to_official, official_to_diffusers
from easyanimate_core.loading import detect_transformer, load_transformer
from easyanimate_core.transformer import (
    V5_12B,
    V51_7B,
    V51_12B,
    EasyAnimateTransformer3D,
    TransformerConfig,
    rope_3d,
    rope_grid_crop,
)
from tests.manifest import manifest

diffusers = pytest.importorskip("diffusers", reason="diffusers is the parity reference (pip install -e '.[test]')")

LATENT = 4
# Tiny geometries: a dual-stream-only model and a 7B-like mix of dual and single-stream blocks.
TINY = {
    "dual": dict(num_layers=2, mmdit_layers=2, add_norm_text_encoder=True),
    "mixed": dict(num_layers=3, mmdit_layers=1, add_norm_text_encoder=True),
    "v5_two_streams": dict(num_layers=2, mmdit_layers=2, add_norm_text_encoder=False, text_embed_dim_t5=24),
}
# Extra input channels per variant: InP = mask 1 + masked video LATENT; Control = control + reference.
VARIANT_EXTRA = {"T2V": 0, "InP": 1 + LATENT, "Control": 2 * LATENT}


def tiny_config(geometry: str, variant: str) -> dict:
    return dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LATENT + VARIANT_EXTRA[variant],
        out_channels=LATENT,
        patch_size=2,
        time_embed_dim=8,
        text_embed_dim=12,
        **TINY[geometry],
    )


def make_reference(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.EasyAnimateTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # diffusers zero-inits some layers; give every weight a visible value
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def make_inputs(cfg: dict, variant: str, seed: int = 1, frames: int = 3, h: int = 8, w: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, LATENT, frames, h, w, generator=g)
    kw = {"encoder_hidden_states": torch.randn(2, 7, cfg["text_embed_dim"], generator=g)}
    if cfg.get("text_embed_dim_t5"):
        kw["encoder_hidden_states_t5"] = torch.randn(2, 5, cfg["text_embed_dim_t5"], generator=g)
    if variant == "InP":
        kw["inpaint_latents"] = torch.randn(2, 1 + LATENT, frames, h, w, generator=g)
    if variant == "Control":
        kw["control_latents"] = torch.randn(2, 2 * LATENT, frames, h, w, generator=g)
    return x, torch.tensor([999.0, 37.5]), kw


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max|ours-ref| = {err:.3g} > {rel} * max|ref| = {rel * scale:.3g}"


def save_official_dir(ref, root, with_config=True):
    folder = root / "transformer"
    folder.mkdir(parents=True)
    sd = {diffusers_to_official(k): v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    if with_config:
        (folder / "config.json").write_text(json.dumps(dict(ref.config)))
    return root


@pytest.mark.parametrize("geometry", list(TINY))
@pytest.mark.parametrize("variant", ["T2V", "InP", "Control"])
def test_parity_with_diffusers_in_every_layout(tmp_path, geometry, variant):
    cfg = tiny_config(geometry, variant)
    ref = make_reference(cfg)
    x, t, kw = make_inputs(cfg, variant)
    with torch.no_grad():
        expected = ref(x, t, return_dict=False, **kw)[0]

    ref.save_pretrained(tmp_path / "diffusers" / "transformer")
    official = save_official_dir(ref, tmp_path / "official")
    single = tmp_path / "single" / "easyanimate.safetensors"
    single.parent.mkdir()
    save_file({diffusers_to_official(k): v.contiguous() for k, v in ref.state_dict().items()}, single)

    for path, layout in [(tmp_path / "diffusers", "diffusers"), (official, "official"), (single, "official")]:
        model = load_transformer(path, compat="diffusers")
        assert model.info.layout == layout
        with torch.no_grad():
            assert_close(model(x, t, **kw), expected)


def test_official_mode_differs_from_diffusers_only_where_documented():
    """With a zero crop start and no single-stream blocks the two modes agree bit for bit."""
    cfg = tiny_config("dual", "T2V")
    ref = make_reference(cfg)
    sd = {diffusers_to_official(k): v for k, v in ref.state_dict().items()}
    models = {}
    for compat in ("official", "diffusers"):
        models[compat] = EasyAnimateTransformer3D(TransformerConfig.from_dict(cfg), compat=compat).eval()
        models[compat].load_state_dict(sd)
    x, t, kw = make_inputs(cfg, "T2V", h=8, w=12)  # 4x6 tokens fill the 30x45 base grid: crop start 0
    assert rope_grid_crop(4, 6, 30, 45)[:2] == (0, 0)
    with torch.no_grad():
        assert torch.equal(models["official"](x, t, **kw), models["diffusers"](x, t, **kw))
        x, t, kw = make_inputs(cfg, "T2V", h=8, w=16)  # 4x8 tokens: crop top 4
        assert rope_grid_crop(4, 8, 30, 45)[0] == 4
        diff = (models["official"](x, t, **kw) - models["diffusers"](x, t, **kw)).abs().max()
    assert diff > 1e-3


def test_official_rope_positions_are_numpy_endpoint_false():
    """The released weights were trained with linspace(start, stop, n, endpoint=False) positions."""
    frames, gh, gw, d = 2, 4, 8, 32
    top, left, bottom, right = rope_grid_crop(gh, gw, 30, 45)
    cos, sin = rope_3d(frames, gh, gw, d, 30, 45, compat="official")
    rows = np.linspace(top, bottom, gh, endpoint=False)
    cols = np.linspace(left, right, gw, endpoint=False)
    dim_t, dim_hw = d // 4, d // 8 * 3
    for t in range(frames):
        for i in range(gh):
            for j in range(gw):
                tok = (t * gh + i) * gw + j
                for pos, lo, dim in ((t, 0, dim_t), (rows[i], dim_t, dim_hw), (cols[j], dim_t + dim_hw, dim_hw)):
                    freqs = 1.0 / 10000 ** (np.arange(0, dim, 2) / dim)
                    angle = np.repeat(pos * freqs, 2)
                    np.testing.assert_allclose(cos[tok, lo : lo + dim].numpy(), np.cos(angle), atol=1e-5)
                    np.testing.assert_allclose(sin[tok, lo : lo + dim].numpy(), np.sin(angle), atol=1e-5)


def test_single_stream_text_goes_through_to_out_in_official_mode():
    """Official single-stream blocks project the text output with attn1.to_out; diffusers 0.42 does not."""
    cfg = TransformerConfig.from_dict(tiny_config("mixed", "T2V"))
    torch.manual_seed(0)
    block = EasyAnimateTransformer3D(cfg).transformer_blocks[-1]
    assert not block.dual_stream
    x, c = torch.randn(1, 10, 32), torch.randn(1, 4, 32)
    rope = rope_3d(1, 2, 5, 16, 30, 45)
    with torch.no_grad():
        block.compat = "official"
        vid_o, txt_o = block.joint_attention(x, c, rope)
        block.compat = "diffusers"
        vid_d, txt_d = block.joint_attention(x, c, rope)
        assert torch.equal(vid_o, vid_d)
        torch.testing.assert_close(txt_o, block.attn1.to_out[0](txt_d))


MANIFEST_MODELS = {
    "v51_12b_inp": (V51_12B, 33, "V5.1", "InP", "12B"),
    "v51_7b_control": (V51_7B, 48, "V5.1", "Control", "7B"),
    "v51_7b_camera": (V51_7B, 38, "V5.1", "Camera", "7B"),
    "v5_12b_inp": (V5_12B, 33, "V5", "InP", "12B"),
}


@pytest.mark.parametrize("name", list(MANIFEST_MODELS))
def test_release_manifest_keys_and_shapes(name):
    preset, in_channels, *_ = MANIFEST_MODELS[name]
    model = EasyAnimateTransformer3D(preset, in_channels=in_channels, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest(name)


def test_diffusers_release_manifest_after_key_conversion():
    model = EasyAnimateTransformer3D(V51_12B, in_channels=33, device="meta")
    ours = {official_to_diffusers(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest("diffusers_v51_12b_inp")


@pytest.mark.parametrize("name", list(MANIFEST_MODELS))
def test_detection_from_release_shapes(name):
    preset, in_channels, version, variant, size = MANIFEST_MODELS[name]
    info = detect_transformer(manifest(name), ["release.safetensors"], {})
    assert (info.version, info.variant, info.size) == (version, variant, size)
    assert info.config == preset.replace(in_channels=in_channels)


def test_detection_reads_diffusers_release_after_conversion():
    shapes = {diffusers_to_official(k): v for k, v in manifest("diffusers_v51_12b_inp").items()}
    info = detect_transformer(shapes, ["x.safetensors"], {})
    assert (info.version, info.variant, info.size) == ("V5.1", "InP", "12B")


def test_every_layer_comes_from_the_injected_operations():
    made = []

    class Ops:
        pass

    for name in ("Linear", "Conv2d", "Conv3d", "LayerNorm", "GroupNorm", "RMSNorm", "Embedding"):
        base = getattr(torch.nn, name)
        setattr(Ops, name, type(name, (base,), {"__init__": _recording_init(base, made)}))
    cfg = TransformerConfig.from_dict(tiny_config("mixed", "InP"))
    model = EasyAnimateTransformer3D(cfg, operations=Ops, dtype=torch.float64)
    with_params = [m for m in model.modules() if list(m.parameters(recurse=False))]
    assert with_params and all(any(m is x for x in made) for m in with_params)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def _recording_init(base, made):
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        made.append(self)

    return __init__


def test_bf16_forward_runs_and_tracks_float32():
    cfg = tiny_config("mixed", "InP")
    ref = make_reference(cfg)
    sd = {diffusers_to_official(k): v for k, v in ref.state_dict().items()}
    x, t, kw = make_inputs(cfg, "InP")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = EasyAnimateTransformer3D(TransformerConfig.from_dict(cfg), dtype=dtype)
        model.load_state_dict(sd)
        with torch.no_grad():
            out[dtype] = model(x.to(dtype), t, **{k: v.to(dtype) for k, v in kw.items()})
    assert out[torch.bfloat16].dtype == torch.bfloat16
    rel = (out[torch.bfloat16].float() - out[torch.float32]).norm() / out[torch.float32].norm()
    assert rel < 0.05


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return EasyAnimateTransformer3D(TransformerConfig.from_dict(tiny_config("dual", "InP"))).eval()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x": torch.randn(1, LATENT, 2, 7, 8)}, "height 7 is not divisible by the patch size 2"),
        ({"x": torch.randn(1, LATENT, 2, 8, 9)}, "nearest valid latent width: 8 or 10"),
        ({"x": torch.randn(1, 3, 2, 8, 8)}, "latents have 3 channels; this model denoises 4-channel"),
        ({"inpaint": None}, "takes 9 input channels but got 4"),
        ({"inpaint": torch.randn(1, 2, 2, 8, 8)}, "takes 9 input channels but got 6"),
        ({"text": torch.randn(1, 5, 10)}, "text states have width 10; this model expects 12"),
    ],
)
def test_bad_inputs_raise_before_compute(tiny_model, change, message):
    args = {"x": torch.randn(1, LATENT, 2, 8, 8), "inpaint": torch.randn(1, 5, 2, 8, 8), "text": torch.randn(1, 5, 12)}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        tiny_model(args["x"], torch.tensor([1.0]), args["text"], inpaint_latents=args["inpaint"])
