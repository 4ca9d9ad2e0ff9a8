"""Memory modes: casting layers, fp8 storage, model offload residency and weight streaming, on tiny models.

There is no GPU here, so the compute device is the CPU and "moving to the device" moves nothing. What
the tests can show instead:
* outputs of every mode against ``full`` (exact for offload; fp8 within a measured bound);
* the manager's moves and residency log with a *distinct* compute device, using stand-in models that
  record ``.to()`` calls (the manager never touches the device itself);
* weight streaming across devices for real: models whose weights sit on the CPU compute on the ``meta``
  device (shapes only), which plain ``torch.nn`` layers refuse, and keep every weight byte on the CPU.
What they cannot show: actual GPU memory freed by an offload, or the peak of one streamed layer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from easyanimate_core import ops
from easyanimate_core.cli import main
from easyanimate_core.offload import FP8, MEMORY_MODES, ModelPlacement, bytes_on
from easyanimate_core.pipeline import generate
from easyanimate_core.sampling import make_sampler
from easyanimate_core.text_encoders import PromptEmbeds, PromptPair
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig, fp16_safe
from easyanimate_core.vae import MagvitVAE, VAEConfig
from easyanimate_core.video_io import read_video
from tests.tiny_checkpoint import write_tiny_checkpoint

TRANSFORMER = TransformerConfig(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=33,  # InP: latents 16 + mask 1 + masked video 16
    out_channels=16,
    num_layers=2,
    mmdit_layers=1,
    time_embed_dim=8,
    text_embed_dim=32,
    add_norm_text_encoder=True,
)
VAE = VAEConfig(latent_channels=16, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
FRAMES, HEIGHT, WIDTH = 5, 32, 32
OFFLOAD_MODES = [m for m in MEMORY_MODES if m not in ("full", "model_cpu_offload_and_qfloat8")]


@pytest.fixture(scope="module")
def weights():
    """Random state dicts for the tiny transformer and VAE (perturbed so no weight is trivial)."""
    torch.manual_seed(0)
    transformer, vae = EasyAnimateTransformer3D(TRANSFORMER), MagvitVAE(VAE)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return transformer.state_dict(), vae.state_dict()


def build(placement: ModelPlacement, weights) -> tuple[nn.Module, nn.Module]:
    """The tiny transformer and VAE built and placed as the CLI does for ``placement``'s mode."""
    kw = {"dtype": placement.dtype, "device": placement.load_device, "operations": placement.operations}
    transformer = EasyAnimateTransformer3D(TRANSFORMER, **kw).eval()
    transformer.load_state_dict(weights[0])
    vae = MagvitVAE(VAE, **kw).eval()
    vae.load_state_dict(weights[1])
    return placement.prepare_transformer(transformer).requires_grad_(False), vae.requires_grad_(False)


def prompts() -> PromptPair:
    g = torch.Generator().manual_seed(1)

    def embeds():
        return PromptEmbeds(torch.randn(1, 6, 32, generator=g), torch.ones(1, 6, dtype=torch.long))

    return PromptPair(embeds(), embeds())


def run(placement: ModelPlacement, weights, **inputs) -> torch.Tensor:
    """Frames [F, H, W, 3] from an image-to-video run (so the VAE also encodes) in ``placement``'s mode."""
    transformer, vae = build(placement, weights)
    sampler = make_sampler("Flow", "V5.1", 2)
    start = torch.rand(HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(2))
    return generate(
        transformer,
        vae,
        prompts(),
        sampler,
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        seed=3,
        start_image=start,
        device=placement.device,
        stage=placement.using,
        **inputs,
    )


# --------------------------------------------------------------------------------------------------
# Casting layers
# --------------------------------------------------------------------------------------------------

LAYERS = {
    "Linear": ((6, 5), (3, 6)),
    "Conv2d": ((3, 4, 3), (2, 3, 8, 8)),
    "Conv3d": ((3, 4, 3), (2, 3, 4, 8, 8)),
    "GroupNorm": ((2, 4), (2, 4, 5, 5)),
    "LayerNorm": ((8,), (3, 8)),
    "RMSNorm": ((8,), (3, 8)),
}


def layer_pair(name: str) -> tuple[nn.Module, nn.Module]:
    """The torch.nn layer ``name`` with random weights, and the casting layer with the same state."""
    args, _ = LAYERS[name]
    torch.manual_seed(0)
    plain = getattr(nn, name)(*args)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_()
    cast = getattr(ops.manual_cast, name)(*args)
    cast.load_state_dict(plain.state_dict())
    return plain, cast


@pytest.mark.parametrize("name", list(LAYERS))
def test_casting_layers_equal_torch_nn_for_fp32_weights(name):
    plain, cast = layer_pair(name)
    x = torch.randn(LAYERS[name][1])
    assert torch.equal(cast(x), plain(x))


@pytest.mark.parametrize("name", list(LAYERS))
def test_casting_layers_compute_in_the_inputs_dtype_and_on_its_device(name):
    plain, cast = layer_pair(name)
    x = torch.randn(LAYERS[name][1], dtype=torch.float64)
    out = cast(x)
    assert out.dtype == torch.float64 and torch.equal(out, plain.double()(x))
    meta = cast(x.to("meta"))  # weights on the CPU, input elsewhere: streamed for this call
    assert meta.device.type == "meta" and meta.shape == out.shape
    assert all(p.device.type == "cpu" for p in cast.parameters())


def test_casting_embedding_fetches_weights_to_the_indices_device():
    plain = nn.Embedding(10, 4)
    cast = ops.manual_cast.Embedding(10, 4)
    cast.load_state_dict(plain.state_dict())
    idx = torch.tensor([[1, 5, 9]])
    assert torch.equal(cast(idx), plain(idx))
    assert cast(idx.to("meta")).device.type == "meta"


# --------------------------------------------------------------------------------------------------
# fp8 storage (model_cpu_offload_and_qfloat8)
# --------------------------------------------------------------------------------------------------


def test_qfloat8_stores_block_linear_weights_as_fp8_and_saves_their_bytes(weights):
    full, _ = build(ModelPlacement("full", "cpu", torch.float32), weights)
    fp8, _ = build(ModelPlacement("model_cpu_offload_and_qfloat8", "cpu", torch.float32), weights)
    block_linears = [m for m in fp8.transformer_blocks.modules() if isinstance(m, nn.Linear)]
    assert block_linears and all(m.weight.dtype == FP8 for m in block_linears)
    assert all(m.bias.dtype == torch.float32 for m in block_linears)  # biases keep the compute dtype
    assert fp8.proj_out.weight.dtype == torch.float32  # only the blocks are stored in fp8
    saved = sum(m.weight.numel() for m in block_linears) * (4 - 1)  # fp32 -> fp8: 3 bytes a weight
    assert bytes_on("cpu", full) - bytes_on("cpu", fp8) == saved


def test_qfloat8_refuses_layers_that_cannot_upcast(weights):
    placement = ModelPlacement("model_cpu_offload_and_qfloat8", "cpu", torch.float32)
    plain = EasyAnimateTransformer3D(TRANSFORMER)  # built from torch.nn, not placement.operations
    with pytest.raises(TypeError, match="manual_cast"):
        placement.prepare_transformer(plain)


# Measured on these tiny models (weights ~N(0, 0.05), three seeds): each fp8 block weight tensor is off by
# 2.7-2.8 % relative RMS (e4m3 keeps 3 mantissa bits: rounding is at most 2^-4 = 6 % of a weight); one
# transformer forward is off by 0.63-0.68 % relative L2 (the errors partly cancel in dot products); frames in
# [0, 1] after 2 Flow steps and a decode are off by 0.002-0.004 on average, 0.019-0.037 at the worst pixel
# (frame std ~0.18). The bounds are ~3x the measurements; the error must also be non-zero (weights changed).
FP8_FORWARD_REL_L2 = 0.02
FP8_FRAMES_MEAN_ABS = 0.01
FP8_FRAMES_MAX_ABS = 0.1


def test_qfloat8_forward_matches_full_within_the_fp8_rounding_bound(weights):
    full, _ = build(ModelPlacement("full", "cpu", torch.float32), weights)
    fp8, _ = build(ModelPlacement("model_cpu_offload_and_qfloat8", "cpu", torch.float32), weights)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    inputs = dict(
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
        inpaint_latents=torch.randn(1, 17, 2, 4, 4, generator=g),
    )
    ref, out = full(x, **inputs), fp8(x, **inputs)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < FP8_FORWARD_REL_L2


# --------------------------------------------------------------------------------------------------
# Every mode against full, through the pipeline
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_frames(weights):
    return run(ModelPlacement("full", "cpu", torch.float32), weights)


@pytest.mark.parametrize("mode", OFFLOAD_MODES)
def test_offload_modes_give_exactly_the_full_output(weights, full_frames, mode):
    assert torch.equal(run(ModelPlacement(mode, "cpu", torch.float32), weights), full_frames)


def test_qfloat8_mode_output_is_within_the_fp8_bound(weights, full_frames):
    frames = run(ModelPlacement("model_cpu_offload_and_qfloat8", "cpu", torch.float32), weights)
    err = (frames - full_frames).abs()
    assert 0 < err.mean() < FP8_FRAMES_MEAN_ABS and err.max() < FP8_FRAMES_MAX_ABS


# --------------------------------------------------------------------------------------------------
# Residency: which models are on the compute device at each stage
# --------------------------------------------------------------------------------------------------


class StandIn:
    """A model stand-in that records where it was moved (lets the test use a compute device it lacks)."""

    def __init__(self):
        self.device = torch.device("cpu")

    def to(self, device):
        self.device = torch.device(device)
        return self


CLI_STAGES = ("text_encoder", "vae", "transformer", "vae")  # encode text, encode images, sample, decode


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_each_stage_has_only_its_own_model_on_a_distinct_device(mode):
    placement = ModelPlacement(mode, "cuda", torch.bfloat16)
    models = {name: StandIn() for name in CLI_STAGES}
    if mode == "full":
        for name, model in models.items():
            placement.add(name, model)
    for stage in CLI_STAGES:
        with placement.using(stage, models[stage]):
            on_device = {n for n, m in models.items() if m.device.type == "cuda"}
            assert on_device == (set(models) if mode == "full" else {stage})
            assert set(placement.resident()) == on_device
        assert models[stage].device.type == ("cuda" if mode == "full" else "cpu")
    assert [stage for stage, _ in placement.log] == list(CLI_STAGES)


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_pipeline_residency_log_per_mode(weights, mode):
    placement = ModelPlacement(mode, "cpu", torch.float32)
    text_encoder = nn.Linear(4, 4)  # model offload moves it like the Hugging Face encoders
    with placement.using("text_encoder", text_encoder):
        pass
    run(placement, weights)
    log = dict(enumerate(placement.log))
    assert [stage for stage, _ in log.values()] == list(CLI_STAGES)
    for stage, resident in log.values():
        if mode == "full":
            assert stage in resident
        elif mode == "sequential_cpu_offload" and stage != "text_encoder":
            assert resident == ()  # the transformer and VAE stream their weights: never resident
        else:
            assert resident == (stage,)
        assert not {"text_encoder", "transformer"} <= set(resident) or mode == "full"


# --------------------------------------------------------------------------------------------------
# Sequential offload: weights stay on the CPU, compute follows the activations
# --------------------------------------------------------------------------------------------------


def test_sequential_models_compute_on_another_device_with_every_weight_on_the_cpu(weights):
    placement = ModelPlacement("sequential_cpu_offload", "meta", torch.float32)
    transformer, vae = build(placement, weights)
    total = bytes_on("cpu", transformer, vae)
    x = torch.randn(1, 16, 2, 4, 4, device="meta")
    text = torch.randn(1, 6, 32, device="meta")
    inpaint = torch.randn(1, 17, 2, 4, 4, device="meta")
    with placement.using("transformer", transformer):
        out = transformer(x, torch.tensor([500.0], device="meta"), text, inpaint_latents=inpaint)
    with placement.using("vae", vae):
        pixels = vae.decode(out)
    assert out.device.type == "meta" and out.shape == x.shape
    assert pixels.device.type == "meta" and pixels.shape == (1, 3, 5, 32, 32)
    assert total > 0 and bytes_on("cpu", transformer, vae) == total and bytes_on("meta", transformer, vae) == 0
    assert placement.log == [("transformer", ()), ("vae", ())]


def test_plain_layers_cannot_compute_away_from_their_weights(weights):
    transformer, _ = build(ModelPlacement("full", "cpu", torch.float32), weights)
    with pytest.raises((RuntimeError, NotImplementedError)):
        transformer.proj_out(torch.randn(1, 32, device="meta"))


# --------------------------------------------------------------------------------------------------
# fp16
# --------------------------------------------------------------------------------------------------


def test_fp16_blocks_stay_finite_when_the_feed_forward_overflows(weights):
    transformer = EasyAnimateTransformer3D(TRANSFORMER, dtype=torch.float16)
    transformer.load_state_dict(weights[0])
    with torch.no_grad():
        transformer.transformer_blocks[0].ff.net[2].weight.fill_(3000.0)  # FFN output far past 65504
    block = transformer.transformer_blocks[0]
    x, context = torch.randn(1, 8, 32, dtype=torch.float16), torch.randn(1, 6, 32, dtype=torch.float16)
    temb = torch.randn(1, 8, dtype=torch.float16)
    rope = transformer.rope(2, 2, 2, "cpu")
    assert not torch.isfinite(block.ff(x)).all()  # the overflow is real
    out_x, out_c = block(x, context, temb, rope)
    assert torch.isfinite(out_x).all() and torch.isfinite(out_c).all()


def test_fp16_safe_leaves_other_dtypes_alone():
    x = torch.tensor([float("inf"), float("nan"), 1.0])
    assert fp16_safe(x) is x
    assert fp16_safe(x.half()).tolist() == [65504.0, 0.0, 1.0]


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "InP", "InP")


def cli_frames(checkpoint, out, mode, *extra) -> torch.Tensor:
    args = ["generate", "--model", str(checkpoint), "--prompt", "a red circle", "--out", str(out)]
    args += ["--frames", str(FRAMES), "--height", "32", "--width", "48", "--steps", "2", "--seed", "1"]
    assert main([*args, "--memory-mode", mode, *extra]) == 0
    return read_video(out)  # a folder of lossless PNG frames


@pytest.mark.parametrize("mode", MEMORY_MODES[1:])
def test_cli_memory_modes_write_the_frames_of_full(checkpoint, tmp_path, capsys, mode):
    full = cli_frames(checkpoint, tmp_path / "full", "full")
    frames = cli_frames(checkpoint, tmp_path / mode, mode, "--verbose")
    if mode == "model_cpu_offload_and_qfloat8":
        err = (frames - full).abs()  # 8-bit frames: the fp8 bounds plus half a level of rounding
        assert 0 < err.mean() < FP8_FRAMES_MEAN_ABS + 0.5 / 255 and err.max() < FP8_FRAMES_MAX_ABS + 0.5 / 255
    else:
        assert torch.equal(frames, full)
    printed = capsys.readouterr().out
    assert f"memory mode {mode}" in printed and "text_encoder: on cpu: text_encoder" in printed
