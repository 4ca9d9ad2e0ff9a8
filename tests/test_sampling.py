"""Samplers and training targets against diffusers' schedulers built from the released configs.

The reference runs the official pipelines' loop (set_timesteps, strength slicing with set_begin_index, add_noise /
scale_noise start, scale_model_input, step) with a deterministic fake model; ours must agree at every step.
"""

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

from easyanimate_core import sampling
from easyanimate_core.sampling import DEFAULTS, SAMPLERS, make_sampler, training_target, training_timesteps

# The released scheduler configs (spec 4.1), including keys that some scheduler classes ignore, because the
# official tools build every sampler with from_pretrained(model, subfolder="scheduler") on these files.
RELEASED_CONFIGS = {
    # V1-V3: the yaml's noise_scheduler_kwargs, which predict_t2v.py passes to each scheduler class's constructor.
    "V3": {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "steps_offset": 1},
    "V4": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.03,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "clip_sample": False,
        "variance_type": "fixed_small",
        "trained_betas": None,
    },
    "V5": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "clip_sample": False,
    },
    "V5.1": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}
REFERENCE_CLASSES = {
    "Euler": EulerDiscreteScheduler,
    "Euler A": EulerAncestralDiscreteScheduler,
    "DPM++": DPMSolverMultistepScheduler,
    "PNDM": PNDMScheduler,
    "DDIM": DDIMScheduler,
    "Flow": FlowMatchEulerDiscreteScheduler,
}
SIGMA_SAMPLERS = ("Euler", "Euler A", "DPM++", "Flow")  # the ones whose schedule is a sigma table
LATENT_SHAPE = (2, 4, 3, 6, 6)
SEED = 1234


def reference_scheduler(name, version, steps, mu=1.0):
    """The diffusers scheduler the official tools would use, with timesteps set as the pipelines set them."""
    scheduler = REFERENCE_CLASSES[name].from_config(RELEASED_CONFIGS[version])
    if name == "Flow":
        scheduler.set_timesteps(steps, mu=mu)
    else:
        scheduler.set_timesteps(steps)
    return scheduler


def fake_model(x, t):
    """A deterministic stand-in denoiser: a smooth function of the latents and the timestep."""
    t = t.reshape(-1, *([1] * (x.dim() - 1)))
    return 0.6 * torch.sin(0.5 * x + t / 300.0) - 0.05 * x + 0.2 * torch.cos(t / 170.0)


def latents_and_noise():
    """Clean latents x0 (for strength < 1) and the initial noise."""
    generator = torch.Generator().manual_seed(SEED)
    x0 = torch.randn(LATENT_SHAPE, generator=generator)
    noise = torch.randn(LATENT_SHAPE, generator=generator)
    return x0, noise


def reference_run(name, version, steps, strength, shift=None):
    """Run diffusers' scheduler through the official pipelines' loop; record everything the model sees."""
    mu = 1.0 if shift is None else math.log(shift)
    scheduler = reference_scheduler(name, version, steps, mu)
    # get_timesteps of the pipelines (copied from the SD img2img pipeline).
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    x0, noise = latents_and_noise()
    # The pipelines scale pure noise by init_noise_sigma when the scheduler has one (flow's has none).
    init_noise_sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    if strength == 1.0:
        latents = noise * init_noise_sigma
    elif name == "Flow":
        latents = scheduler.scale_noise(x0, timesteps[:1], noise)
    else:
        latents = scheduler.add_noise(x0, noise, timesteps[:1])
    step_params = inspect.signature(scheduler.step).parameters
    generator = torch.Generator().manual_seed(SEED + 1)
    extra = {"generator": generator} if "generator" in step_params else {}
    extra.update({"eta": 0.0} if "eta" in step_params else {})
    record = {"timesteps": timesteps.float(), "start": latents, "inputs": [], "outputs": []}
    record["sigmas"] = scheduler.sigmas[t_start:] if name in SIGMA_SAMPLERS else None
    record["init_noise_sigma"] = float(init_noise_sigma)
    for t in timesteps:
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        # The pipelines feed the timestep as a tensor in the latents' dtype.
        t_model = torch.tensor([t] * LATENT_SHAPE[0]).to(model_input.dtype)
        latents = scheduler.step(fake_model(model_input, t_model), t, latents, **extra, return_dict=False)[0]
        record["inputs"].append(model_input)
        record["outputs"].append(latents)
    return record


def our_run(name, version, steps, strength, shift=None):
    """The same loop through our sampler."""
    sampler = make_sampler(name, version, steps, strength=strength, shift=shift)
    x0, noise = latents_and_noise()
    latents = sampler.initial_latents(noise, x0)
    generator = torch.Generator().manual_seed(SEED + 1)
    record = {"timesteps": sampler.timesteps, "sigmas": sampler.sigmas, "start": latents, "inputs": [], "outputs": []}
    record["init_noise_sigma"] = sampler.init_noise_sigma
    for i in range(sampler.num_steps):
        model_input = sampler.scale_model_input(latents, i)
        t_model = sampler.timesteps[i].expand(LATENT_SHAPE[0])
        latents = sampler.step(fake_model(model_input, t_model), i, latents, generator=generator)
        record["inputs"].append(model_input)
        record["outputs"].append(latents)
    return record


RUNS = [(name, version) for version in ("V3", "V4", "V5", "V5.1") for name in SAMPLERS[version]]


@pytest.mark.parametrize("steps", [7, 10])
@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize(("name", "version"), RUNS)
def test_run_matches_diffusers(name, version, steps, strength):
    ref, ours = reference_run(name, version, steps, strength), our_run(name, version, steps, strength)
    assert torch.equal(ours["timesteps"], ref["timesteps"])
    assert ours["timesteps"].dtype == torch.float32
    if ref["sigmas"] is not None:
        assert torch.equal(ours["sigmas"], ref["sigmas"])
    assert ours["init_noise_sigma"] == ref["init_noise_sigma"]
    assert torch.equal(ours["start"], ref["start"])
    assert len(ours["outputs"]) == len(ref["outputs"]) > 0
    # Same float32 operations in the same order: bit-for-bit equal on CPU.
    for step, (a, b) in enumerate(zip(ours["inputs"], ref["inputs"], strict=True)):
        assert torch.equal(a, b), f"model input at step {step}: max diff {(a - b).abs().max()}"
    for step, (a, b) in enumerate(zip(ours["outputs"], ref["outputs"], strict=True)):
        assert torch.equal(a, b), f"latents after step {step}: max diff {(a - b).abs().max()}"
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_shift_override_matches_diffusers_mu(shift):
    ref, ours = reference_run("Flow", "V5.1", 8, 1.0, shift), our_run("Flow", "V5.1", 8, 1.0, shift)
    assert torch.equal(ours["sigmas"], ref["sigmas"])
    assert all(torch.equal(a, b) for a, b in zip(ours["outputs"], ref["outputs"], strict=True))


@pytest.mark.parametrize(("name", "version"), RUNS)
def test_schedules_match_diffusers_for_many_step_counts(name, version):
    """Timestep spacing (float arange and rounding included) over a wide range of step counts."""
    for steps in [4, 5, 6, 9, 11, 13, 17, 20, 25, 30, 33, 43, 50, 61, 70, 99, 100, 103, 128, 250, 333, 999, 1000]:
        scheduler = reference_scheduler(name, version, steps)
        sampler = make_sampler(name, version, steps)
        # PNDM adds 9 evaluations: 12 Runge-Kutta evaluations replace its first 3 steps.
        assert sampler.num_steps == steps + (9 if name == "PNDM" else 0), steps
        # Equal up to diffusers' spurious extra trailing step (see test_trailing_spacing_keeps_exactly_n_steps).
        assert torch.equal(sampler.timesteps, scheduler.timesteps[: sampler.num_steps].float()), steps
        if name in SIGMA_SAMPLERS:
            assert torch.equal(sampler.sigmas[:-1], scheduler.sigmas[: sampler.num_steps]), steps
            assert sampler.sigmas[-1] == 0


@pytest.mark.parametrize("name", ["DDIM", "Euler", "DPM++"])
def test_trailing_spacing_keeps_exactly_n_steps(name):
    """For N = 61 diffusers' float arange yields N + 1 trailing timesteps, the last -1; we keep the first N."""
    scheduler, sampler = reference_scheduler(name, "V5", 61), make_sampler(name, "V5", 61)
    assert len(scheduler.timesteps) == 62 and scheduler.timesteps[-1] == -1
    assert torch.equal(sampler.timesteps, scheduler.timesteps[:61].float())
    assert sampler.timesteps.min() >= 0


@pytest.mark.parametrize(("name", "version"), [r for r in RUNS if r[0] in ("DDIM", "PNDM", "Euler", "DPM++")])
def test_schedule_tables_match_diffusers(name, version):
    scheduler = reference_scheduler(name, version, 10)
    sampler = make_sampler(name, version, 10)
    if name in ("DDIM", "PNDM"):
        assert torch.equal(sampler.alphas_cumprod, scheduler.alphas_cumprod)
    else:
        table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5
        assert torch.equal(sampling._karras_sigmas_table(sampling.SCHEDULES[version]), table)


@pytest.mark.parametrize(("name", "version"), RUNS)
def test_add_noise_matches_diffusers_at_every_step(name, version):
    """add_noise(x0, noise, i) at each run step i, as the latent-blend inpainting path uses it."""
    steps, strength = 8, 0.75
    scheduler = reference_scheduler(name, version, steps)
    t_start = steps - int(steps * strength)
    timesteps = scheduler.timesteps[t_start:]
    sampler = make_sampler(name, version, steps, strength=strength)
    x0, noise = latents_and_noise()
    for i, t in enumerate(timesteps):
        # An unset begin index makes diffusers look the timestep up, which is what this checks independently.
        scheduler._begin_index = None
        if name == "Flow":
            expected = scheduler.scale_noise(x0, t.reshape(1), noise)
        else:
            expected = scheduler.add_noise(x0, noise, t.reshape(1))
        assert torch.equal(sampler.add_noise(x0, noise, i), expected), i


def test_defaults_are_the_official_ones():
    assert DEFAULTS == {
        "V1": ("DPM++", 30, 6.0),
        "V2": ("DPM++", 30, 6.0),
        "V3": ("DPM++", 25, 7.0),
        "V4": ("Euler", 25, 7.0),
        "V5": ("DDIM", 50, 6.0),
        "V5.1": ("Flow", 50, 6.0),
    }
    for version, (name, steps, _) in DEFAULTS.items():
        assert name in SAMPLERS[version]
        assert make_sampler(name, version, steps).num_steps == steps


def test_strength_keeps_the_last_int_n_times_s_steps():
    for strength in (0.1, 0.25, 0.7, 0.99, 1.0):
        full = make_sampler("DDIM", "V5", 50)
        partial = make_sampler("DDIM", "V5", 50, strength=strength)
        kept = int(50 * strength)
        assert torch.equal(partial.timesteps, full.timesteps[50 - kept :])


def euler_ancestral_run(seed):
    """A V5 "Euler A" run whose step noise comes from a generator seeded with ``seed``."""
    sampler = make_sampler("Euler A", "V5", 6)
    x = sampler.initial_latents(latents_and_noise()[1])
    generator = torch.Generator().manual_seed(seed)
    for i in range(sampler.num_steps):
        prediction = fake_model(sampler.scale_model_input(x, i), sampler.timesteps[i].expand(LATENT_SHAPE[0]))
        x = sampler.step(prediction, i, x, generator=generator)
    return x


def test_euler_ancestral_is_deterministic_per_seed_and_uses_the_generator():
    assert torch.equal(euler_ancestral_run(5), euler_ancestral_run(5))
    assert not torch.equal(euler_ancestral_run(5), euler_ancestral_run(6))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("foo", "V5.1", 10), {}, "unknown sampler 'foo'; valid for V5.1: Flow"),
        (("foo", "V4", 10), {}, "unknown sampler 'foo'; valid for V4: Euler, Euler A, DPM++, PNDM, DDIM"),
        (("DDIM", "V5.1", 10), {}, "sampler 'DDIM' is not available for V5.1; valid for V5.1: Flow"),
        (("Flow", "V5", 10), {}, "sampler 'Flow' is not available for V5; valid for V5: Euler, Euler A"),
        (("Flow", "V6", 10), {}, "unknown EasyAnimate version 'V6'; valid: V1, V2, V3, V4, V5, V5.1"),
        (("DDIM", "V5", 0), {}, "steps must be an integer in [1, 1000], got 0"),
        (("DDIM", "V5", 1001), {}, "steps must be an integer in [1, 1000], got 1001"),
        (("DDIM", "V5", 2.5), {}, "steps must be an integer in [1, 1000], got 2.5"),
        (("DDIM", "V5", True), {}, "steps must be an integer"),
        (("PNDM", "V5", 3), {}, "PNDM needs at least 4 steps"),
        (("DDIM", "V5", 10), {"strength": 0.0}, "strength must be in (0, 1], got 0.0"),
        (("DDIM", "V5", 10), {"strength": 1.5}, "strength must be in (0, 1], got 1.5"),
        (("DDIM", "V5", 10), {"strength": float("nan")}, "strength must be in (0, 1], got nan"),
        (("DDIM", "V5", 10), {"strength": 0.05}, "strength 0.05 keeps no step of 10"),
        (("DDIM", "V5", 10), {"shift": 3.0}, "shift applies to the Flow sampler only"),
        (("Flow", "V5.1", 10), {"shift": -1.0}, "shift must be a positive number"),
    ],
)
def test_invalid_requests_fail_before_any_compute(monkeypatch, args, kwargs, message):
    def no_compute(*_, **__):
        raise AssertionError("computed a schedule before validating the request")

    for cls in (sampling.FlowSampler, sampling.DDIMSampler, sampling.PNDMSampler, sampling.EulerSampler):
        monkeypatch.setattr(cls, "__init__", no_compute)
    monkeypatch.setattr(sampling.DPMSolver2MSampler, "__init__", no_compute)
    with pytest.raises(ValueError) as error:
        make_sampler(*args, **kwargs)
    assert message in str(error.value)


def test_multistep_samplers_refuse_out_of_order_steps():
    for name in ("DPM++", "PNDM"):
        sampler = make_sampler(name, "V5", 10)
        x = torch.zeros(LATENT_SHAPE)
        with pytest.raises(ValueError, match="keeps history between steps: expected step 0, got 1"):
            sampler.step(x, 1, x)


def test_partial_denoise_needs_the_clean_latents():
    sampler = make_sampler("Flow", "V5.1", 10, strength=0.5)
    with pytest.raises(ValueError, match="pass x0"):
        sampler.initial_latents(torch.zeros(LATENT_SHAPE))


def test_flow_training_target_follows_the_rectified_flow_definition():
    reference = FlowMatchEulerDiscreteScheduler.from_config(RELEASED_CONFIGS["V5.1"])  # unshifted sigma table
    x0, noise = latents_and_noise()
    t = torch.tensor([0, 999])
    example = training_target("V5.1", x0, noise, t)
    # diffusers' table runs from sigma 1 (index 0) down to 0.001 (index 999): training timestep t is index 999 - t.
    sigma = reference.sigmas[999 - t].reshape(-1, 1, 1, 1, 1)
    assert torch.equal(example.noisy, (1.0 - sigma) * x0 + sigma * noise)
    assert torch.equal(example.target, noise - x0)
    assert torch.equal(example.model_timestep, reference.timesteps[999 - t])
    assert torch.equal(example.noisy[1], noise[1])  # sigma 1 is pure noise


@pytest.mark.parametrize("version", ["V4", "V5"])
def test_v_prediction_training_target_follows_ddpm(version):
    reference = DDPMScheduler.from_config(RELEASED_CONFIGS[version])
    x0, noise = latents_and_noise()
    t = torch.tensor([3, 999])
    example = training_target(version, x0, noise, t)
    assert torch.equal(example.noisy, reference.add_noise(x0, noise, t))
    assert torch.equal(example.target, reference.get_velocity(x0, noise, t))
    assert torch.equal(example.model_timestep, t.float())
    if version == "V5":  # zero terminal SNR: the last training step is pure noise and v = -x0
        assert torch.equal(example.noisy[1], noise[1])
        assert torch.equal(example.target[1], -x0[1])


def test_epsilon_training_target_follows_ddpm_on_linear_betas():
    """V1-V3: DDPM noising on the linear betas, regressing onto the noise."""
    reference = DDPMScheduler(**RELEASED_CONFIGS["V3"])
    x0, noise = latents_and_noise()
    t = torch.tensor([0, 999])
    example = training_target("V3", x0, noise, t)
    assert torch.equal(example.noisy, reference.add_noise(x0, noise, t))
    assert torch.equal(example.target, noise)
    assert torch.equal(example.model_timestep, t.float())


def test_training_timesteps_and_validation():
    a = training_timesteps(64, torch.Generator().manual_seed(0))
    b = training_timesteps(64, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert 0 <= a.min() and a.max() < 1000
    x0, noise = latents_and_noise()
    with pytest.raises(ValueError, match=r"training timesteps must lie in \[0, 1000\)"):
        training_target("V5", x0, noise, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="unknown EasyAnimate version"):
        training_target("V6", x0, noise, torch.tensor([0, 1]))
