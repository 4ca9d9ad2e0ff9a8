"""EasyAnimate Sampler on the stand-in: what it asks ComfyUI's sampling to run, and what it refuses up front.

The stand-in's ``comfy.sample.sample`` records its arguments; the real sampling (and equality with the stock
KSampler) is checked in tests/integration/test_conditioning.py.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from easyanimate_core.sampling import SCHEDULES, alphas_cumprod, flow_sigmas, make_sampler
from tests.comfy_standin import REPO, install

SHAPE = (1, 16, 2, 2, 4)


def load(nodes, tiny_folders, version):
    return nodes.nodes.EasyAnimateModelLoader().load(install(nodes, tiny_folders, version), "default")[0]


def conditioning(version):
    g = torch.Generator().manual_seed(1)
    extras = {"easyanimate_text_2": torch.randn(1, 6, 32, generator=g)} if version == "V5" else {}
    return [[torch.randn(1, 7, 32, generator=g), extras]]


def run(nodes, model, version, **settings):
    """Run the node with the released defaults unless overridden; returns (output latent, recorded sample call)."""
    calls = sys.modules["comfy.sample"].calls
    calls.clear()
    args = dict(seed=3, steps=8, cfg=6.0, sampler_name="default", scheduler="default", denoise=1.0, shift=0.0)
    args.update(settings)
    latent = {"samples": settings.pop("latent", torch.zeros(SHAPE))}
    (out,) = nodes.nodes.EasyAnimateSampler().sample(
        model, conditioning(version), conditioning(version), latent, **args
    )
    assert len(calls) == 1
    return out, calls[0]


def test_inputs_default_to_the_released_settings(nodes):
    required = nodes.nodes.EasyAnimateSampler.INPUT_TYPES()["required"]
    assert required["steps"][1]["default"] == 50 and required["cfg"][1]["default"] == 6.0
    assert required["sampler_name"][0][0] == "default" and required["scheduler"][0][0] == "default"
    assert "euler" in required["sampler_name"][0] and "simple" in required["scheduler"][0]
    assert required["shift"][1]["default"] == 0.0
    assert all(spec[1].get("tooltip") for spec in required.values())


def test_v51_default_is_euler_on_the_released_flow_schedule(nodes, tiny_folders):
    model = load(nodes, tiny_folders, "V5.1")
    out, call = run(nodes, model, "V5.1")
    assert call["sampler_name"] == "euler" and call["steps"] == 8 and call["cfg"] == 6.0 and call["seed"] == 3
    torch.testing.assert_close(call["sigmas"], flow_sigmas(8), rtol=0, atol=0)
    assert call["model"] is model
    expected_noise = torch.randn(SHAPE, generator=torch.manual_seed(3))  # ComfyUI's prepare_noise
    torch.testing.assert_close(call["noise"], expected_noise, rtol=0, atol=0)
    assert out["samples"].shape == SHAPE


def test_denoise_is_the_official_strength_on_the_default_schedule(nodes, tiny_folders):
    model = load(nodes, tiny_folders, "V5.1")
    _, call = run(nodes, model, "V5.1", steps=10, denoise=0.7)
    expected = make_sampler("Flow", "V5.1", 10, strength=0.7).sigmas  # the last 7 of the 10-step schedule
    assert len(call["sigmas"]) == 8
    torch.testing.assert_close(call["sigmas"], expected, rtol=0, atol=0)


def test_v5_default_is_ddim_on_the_released_trailing_timesteps(nodes, tiny_folders):
    model = load(nodes, tiny_folders, "V5")
    _, call = run(nodes, model, "V5", steps=10)
    assert call["sampler_name"] == "ddim"
    sigmas = call["sigmas"]
    timesteps = make_sampler("DDIM", "V5", 10).timesteps.long()
    assert timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    abar = alphas_cumprod(SCHEDULES["V5"]).double()
    core = ((1 - abar) / abar).sqrt()[timesteps[1:]]
    # ComfyUI's zero-terminal-SNR table (float64, then float32) against core's float32 one: 1e-4 relative.
    torch.testing.assert_close(sigmas[1:-1].double(), core, rtol=1e-4, atol=0)
    assert sigmas[0] > 1000 and sigmas[-1] == 0  # a finite stand-in for infinite noise, then the clean end


def test_a_comfy_scheduler_is_passed_through_as_the_stock_ksampler_would(nodes, tiny_folders):
    model = load(nodes, tiny_folders, "V5.1")
    _, call = run(nodes, model, "V5.1", sampler_name="dpmpp_2m", scheduler="simple", denoise=0.5)
    assert call["sigmas"] is None
    assert (call["sampler_name"], call["scheduler"], call["denoise"], call["steps"]) == ("dpmpp_2m", "simple", 0.5, 8)


def test_shift_patches_the_model_sampling_and_the_default_schedule(nodes, tiny_folders):
    model = load(nodes, tiny_folders, "V5.1")
    _, call = run(nodes, model, "V5.1", shift=5.0)
    assert call["model"] is not model  # a clone, as ModelSamplingSD3 makes
    assert call["model"].get_model_object("model_sampling").shift == 5.0
    assert model.get_model_object("model_sampling").shift == pytest.approx(math.e)
    torch.testing.assert_close(call["sigmas"], make_sampler("Flow", "V5.1", 8, shift=5.0).sigmas, rtol=0, atol=0)


def test_shift_on_v5_is_refused(nodes, tiny_folders):
    model = load(nodes, tiny_folders, "V5")
    with pytest.raises(ValueError, match="shift applies to flow-matching models \\(V5.1\\).*set shift to 0"):
        run(nodes, model, "V5", shift=3.0)


def test_control_conditioning_on_an_inp_model_is_refused_before_sampling(nodes, tiny_folders):
    model = load(nodes, tiny_folders, "V5.1")
    positive = conditioning("V5.1")
    positive[0][1]["easyanimate_control_latents"] = torch.zeros(1, 16, 2, 2, 4)
    latent = {"samples": torch.zeros(SHAPE)}
    sys.modules["comfy.sample"].calls.clear()
    nodes.mm.loads.clear()
    with pytest.raises(ValueError, match="positive conditioning: control latents .* this model is InP"):
        nodes.nodes.EasyAnimateSampler().sample(
            model, positive, conditioning("V5.1"), latent, 0, 4, 6.0, "default", "default", 1.0, 0.0
        )
    assert sys.modules["comfy.sample"].calls == [] and nodes.mm.loads == []  # nothing loaded, nothing sampled


def test_a_non_easyanimate_model_is_refused(nodes, tiny_folders):
    model = load(nodes, tiny_folders, "V5.1").clone()
    model.model = torch.nn.Module()
    with pytest.raises(ValueError, match="not an EasyAnimate model; sample it with ComfyUI's KSampler"):
        run(nodes, model, "V5.1")


def test_denoise_keeping_no_step_is_refused_at_validation(nodes):
    validate = nodes.nodes.EasyAnimateSampler.VALIDATE_INPUTS
    assert validate(steps=50, denoise=0.01, scheduler="default") == (
        "denoise 0.01 keeps no step of 50: raise denoise to 0.02 or more, or add steps"
    )
    assert validate(steps=50, denoise=0.02, scheduler="default") is True
    assert validate(steps=50, denoise=0.01, scheduler="simple") is True  # ComfyUI's own denoise rule applies


def test_memory_estimate_covers_the_measured_peak_of_a_forward(nodes, tiny_folders):
    """The estimate load_models_gpu reserves is at least the peak activation memory of the tiny model's forward
    (measured with the bench's tensor tracker) and within 4x of it; it is linear in batch and tokens."""
    spec = importlib.util.spec_from_file_location("measure", REPO / "bench" / "measure_transformer_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = load(nodes, tiny_folders, "V5.1").model
    transformer = model.diffusion_model.transformer
    x, text = torch.randn(2, 16, 5, 16, 16), torch.randn(2, 256, 32)
    inpaint, step = torch.zeros(2, 17, 5, 16, 16), torch.full((2,), 500.0)
    existing = [*transformer.parameters(), *transformer.buffers(), x, text, inpaint, step]
    with torch.no_grad(), bench.PeakTensorBytes(existing) as tracker:
        transformer(x, step, text, inpaint_latents=inpaint)
    estimate = model.memory_required(x.shape)
    assert tracker.peak <= estimate <= 4 * tracker.peak, (tracker.peak, estimate)
    assert model.memory_required((4, 16, 5, 16, 16)) == 2 * estimate
