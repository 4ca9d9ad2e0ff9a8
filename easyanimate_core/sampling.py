"""Noise schedules and samplers for EasyAnimate V1-V3, V4, V5 and V5.1, matching the released scheduler configs.

Public API
    VERSIONS                      ("V1", "V2", "V3", "V4", "V5", "V5.1")
    SAMPLERS[version]             sampler names offered for a version (the official tools' choices)
    DEFAULTS[version]             (sampler, steps, guidance) of the official tools
    make_sampler(name, version, steps, *, strength=1.0, shift=None) -> Sampler
        Validates everything before computing anything (ValueError with the valid choices).
    Sampler
        .timesteps                float32 [n]: the timestep to feed the model at run step i (0..n-1). For V4/V5
                                  these are integer training timesteps in [0, 999]; for V5.1 they are sigma * 1000.
        .sigmas                   float32 [n + 1] noise levels of the run steps plus the final one (schedule units:
                                  sqrt((1 - abar) / abar) for the Euler/DPM family, sigma for flow, absent (None)
                                  for DDIM/PNDM which work on alphas_cumprod).
        .init_noise_sigma         float: scale of pure-noise initial latents.
        .initial_latents(noise, x0=None)   start latents: noise * init_noise_sigma, or x0 noised to step 0 when
                                  strength < 1 (video-to-video / partial denoise).
        .add_noise(x0, noise, i)  x0 noised to run step i (add_noise, or scale_noise for flow).
        .scale_model_input(x, i)  what to feed the model at step i (Euler samplers divide by sqrt(sigma^2 + 1)).
        .step(model_output, i, x, generator=None) -> x for step i + 1. Multistep samplers (DPM++, PNDM) keep
                                  history, so steps must be taken in order 0, 1, 2, ...
    training_timesteps(batch, generator=None)  uniform integer training timesteps in [0, 1000)
    training_target(version, x0, noise, t) -> TrainingExample(noisy, target, model_timestep)

Samplers: "Euler", "Euler A", "DPM++" (2M), "PNDM", "DDIM" for V4 and V5 (v-prediction, each built from that
version's released config) and for V1-V3 (epsilon prediction on linear betas; the official predict scripts build
each scheduler class from the yaml's four ``noise_scheduler_kwargs``, so everything else is that class's default:
"linspace" spacing for Euler / Euler A / DPM++, "leading" with steps_offset 1 for DDIM / PNDM, and DDIM clips its
clean-sample estimate to [-1, 1]); "Flow" for V5.1 (rectified flow, Euler on the mu = 1 exponentially shifted sigmas).
The discrete samplers are refused for V5.1 and Flow for V4/V5, as in the official tools.

Every sampler reproduces the matching diffusers scheduler built with ``from_config`` from the released config
(the way the official pipelines build them), operation for operation, so float32 results agree bit for bit on
CPU. That includes diffusers' quirks, kept on purpose so that outputs match the official tools:
* PNDM has no zero-terminal-SNR option, so for V5 it uses the plain (un-rescaled) betas.
* DDIM steps to t - 1000 // N, which for trailing spacing is not always the next scheduled timestep.
* With strength < 1, PNDM's Runge-Kutta warm-up runs on the first timesteps kept, as diffusers does.
Deliberate differences, both where diffusers misbehaves:
* Trailing spacing (V5) keeps exactly N steps. For some N (61, 103, 121, ...) diffusers' float arange adds an
  (N+1)-th timestep -1, which for V5 DDIM turns the finished sample into -v.
* V4 schedules reaching timestep 1000 (N = 1000, DPM++ N = 999) look tables up at 999; diffusers' Euler/DPM
  do the same via np.interp, its DDIM/PNDM raise IndexError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

PIXART_VERSIONS = ("V1", "V2", "V3")  # one scheduler config for the PixArt-motion releases
VERSIONS = (*PIXART_VERSIONS, "V4", "V5", "V5.1")
DISCRETE_SAMPLERS = ("Euler", "Euler A", "DPM++", "PNDM", "DDIM")
SAMPLERS = {**dict.fromkeys(PIXART_VERSIONS, DISCRETE_SAMPLERS), "V4": DISCRETE_SAMPLERS, "V5": DISCRETE_SAMPLERS}
SAMPLERS["V5.1"] = ("Flow",)
# V1-V3: the predict_t2v.py of each release (V1 at 1a1720c, V2 at fb0916f, V3 at f9eeabe).
DEFAULTS = {"V1": ("DPM++", 30, 6.0), "V2": ("DPM++", 30, 6.0), "V3": ("DPM++", 25, 7.0), "V4": ("Euler", 25, 7.0)}
DEFAULTS.update({"V5": ("DDIM", 50, 6.0), "V5.1": ("Flow", 50, 6.0)})

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class DiscreteSchedule:
    """A released DDPM-family scheduler config."""

    beta_start: float
    beta_end: float
    zero_terminal_snr: bool
    spacing: str  # "leading" or "trailing"
    steps_offset: int
    set_alpha_to_one: bool | None  # None: the config leaves it to each scheduler's default
    beta_schedule: str = "scaled_linear"  # or "linear"
    prediction: str = "v_prediction"  # or "epsilon"
    clip_sample: bool = False  # DDIM clamps its clean-sample estimate to [-1, 1]
    # The spacing of the sigma samplers (Euler, Euler A, DPM++) where it differs: V1-V3's config leaves it to
    # their class default, "linspace", while DDIM / PNDM default to "leading".
    sigma_spacing: str | None = None

    @property
    def spacing_of_sigma_samplers(self) -> str:
        """The timestep spacing Euler, Euler A and DPM++ use."""
        return self.sigma_spacing or self.spacing


@dataclass(frozen=True)
class FlowSchedule:
    """The released V5.1 rectified-flow config; pipelines always pass mu = 1 (dynamic shifting on)."""

    mu: float = 1.0


# V1-V3's yaml noise_scheduler_kwargs (beta_start, beta_end, "linear", steps_offset 1); the rest class defaults.
PIXART_SCHEDULE = DiscreteSchedule(
    0.0001, 0.02, False, "leading", 1, None, beta_schedule="linear", prediction="epsilon", clip_sample=True,
    sigma_spacing="linspace",
)  # fmt: skip
SCHEDULES = {
    **dict.fromkeys(PIXART_VERSIONS, PIXART_SCHEDULE),
    # HunyuanDiT's DDPMScheduler config (no set_alpha_to_one key).
    "V4": DiscreteSchedule(0.00085, 0.03, False, "leading", 1, None),
    "V5": DiscreteSchedule(0.00085, 0.012, True, "trailing", 0, True),
    "V5.1": FlowSchedule(),
}


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def alphas_cumprod(schedule: DiscreteSchedule, zero_terminal_snr: bool | None = None) -> torch.Tensor:
    """float32 [1000] cumulative alphas of a discrete schedule (zero_terminal_snr overrides the config's)."""
    if schedule.beta_schedule == "linear":
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    else:
        start, end = schedule.beta_start**0.5, schedule.beta_end**0.5
        betas = torch.linspace(start, end, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    rescale = schedule.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr
    if rescale:
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _karras_sigmas_table(schedule: DiscreteSchedule) -> torch.Tensor:
    """sqrt((1 - abar) / abar) per training timestep, with the last abar kept just above 0 (so sigma stays finite)."""
    abar = alphas_cumprod(schedule)
    if schedule.zero_terminal_snr:
        abar[-1] = 2**-24  # the smallest positive fp16 subnormal, as diffusers' Euler/DPM schedulers use
    return ((1 - abar) / abar) ** 0.5


def _arange(start: float, stop: float, step: float) -> list[float]:
    """numpy.arange for floats, value for value: start, start + step, then start + i * (the first step taken)."""
    count = max(math.ceil((stop - start) / step), 0)
    second = start + step
    delta = second - start
    return [start, second, *(start + i * delta for i in range(2, count))][:count]


def _linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """numpy.linspace in float64, value for value (start + i * step, last value exactly stop)."""
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    values = torch.arange(num, dtype=torch.float64) * ((stop - start) / (num - 1)) + start
    values[-1] = stop
    return values


def _spaced_timesteps(schedule: DiscreteSchedule, steps: int, spacing: str | None = None) -> list[float]:
    """Descending training timesteps of an N-step run (diffusers' "leading" / "trailing" / "linspace" spacing)."""
    spacing = spacing or schedule.spacing
    if spacing == "linspace":  # fractional timesteps (float32, as diffusers' Euler schedulers keep them)
        values = _linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps).float().flip(0)
        return values.tolist()
    if spacing == "leading":
        ratio = NUM_TRAIN_TIMESTEPS // steps
        return [i * ratio + schedule.steps_offset for i in reversed(range(steps))]
    ratio = NUM_TRAIN_TIMESTEPS / steps
    # For some N (61, 103, ...) rounding makes numpy's arange yield N + 1 values, the last one timestep -1;
    # diffusers then runs an extra step at t = -1 (for DDIM with V5, a step at alphas_cumprod[-1] = 0 that
    # turns the finished sample into -v). Keep exactly N steps.
    return [round(t) - 1 for t in _arange(NUM_TRAIN_TIMESTEPS, 0, -ratio)][:steps]


def _dpm_timesteps(schedule: DiscreteSchedule, steps: int) -> list[int]:
    """DPM-Solver's spacing: its "leading" divides by N + 1 and drops timestep 0, its "linspace" spans N + 1
    rounded points and drops the last (unlike the other schedulers)."""
    spacing = schedule.spacing_of_sigma_samplers
    if spacing == "linspace":
        return [round(t) for t in _linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps + 1).tolist()][::-1][:-1]
    if spacing == "leading":
        ratio = NUM_TRAIN_TIMESTEPS // (steps + 1)
        return [i * ratio + schedule.steps_offset for i in reversed(range(1, steps + 1))]
    return _spaced_timesteps(schedule, steps)


def _interpolate(table: torch.Tensor, timesteps: list[float]) -> torch.Tensor:
    """float32 table values at (possibly fractional) timesteps, linear in between, held past either end
    (numpy.interp in float64, as diffusers' sigma schedulers look their sigmas up)."""
    t = torch.tensor(timesteps, dtype=torch.float64).clamp(0, len(table) - 1)
    low = t.floor().long().clamp(max=len(table) - 2)
    values = table.double()
    slope = values[low + 1] - values[low]
    return (slope * (t - low.double()) + values[low]).float()


def flow_sigmas(steps: int, mu: float = 1.0) -> torch.Tensor:
    """float32 [N + 1] V5.1 sigmas: linspace(1, 0.001) exponentially time-shifted by mu, then a final 0."""
    sigma_max = 1.0
    sigma_min = torch.tensor(1 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32).item()  # the float32 table's last entry
    raw = _linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps) / NUM_TRAIN_TIMESTEPS
    # Tensor / tensor divisions: a Python scalar over a tensor goes through reciprocal (two roundings).
    e_mu = torch.tensor(math.exp(mu), dtype=torch.float64)
    shifted = e_mu / (e_mu + (torch.ones_like(raw) / raw - 1))
    return torch.cat([shifted.float(), torch.zeros(1, dtype=torch.float32)])


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device (as diffusers' randn_tensor)."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar coefficient shaped to broadcast over a [B, ...] tensor."""
    return value.to(device=like.device, dtype=like.dtype).reshape(1, *([1] * (like.dim() - 1)))


class Sampler:
    """One configured sampling run; see the module docstring for the contract."""

    name: str
    version: str
    order_dependent = False  # multistep samplers must be stepped 0, 1, 2, ...

    def __init__(self, name: str, version: str, full_timesteps: torch.Tensor, start: int):
        self.name, self.version = name, version
        self.start = start  # index into the full N-step schedule where this run begins (strength < 1)
        self.timesteps = full_timesteps[start:].float()
        self.sigmas: torch.Tensor | None = None
        self.init_noise_sigma = 1.0
        self._next = 0

    @property
    def num_steps(self) -> int:
        """Model evaluations in this run."""
        return len(self.timesteps)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The latents to feed the model at step i."""
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """Clean latents x0 noised to the level of run step i."""
        raise NotImplementedError

    def initial_latents(self, noise: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Start latents: scaled pure noise (strength 1) or x0 noised to the first kept step (strength < 1)."""
        if self.start == 0:
            return noise * self.init_noise_sigma
        if x0 is None:
            raise ValueError(f"strength < 1 starts from existing latents: pass x0 to {self.name}.initial_latents")
        return self.add_noise(x0, noise, 0)

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Latents after run step i, given the model's (guided) prediction at step i."""
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step {i} outside this {self.num_steps}-step run")
        if self.order_dependent and i != self._next:
            raise ValueError(f"{self.name} keeps history between steps: expected step {self._next}, got {i}")
        self._next = i + 1
        return self._step(model_output, i, x, generator)

    def _step(self, model_output, i, x, generator):
        raise NotImplementedError


class FlowSampler(Sampler):
    """V5.1 "Flow": Euler on the rectified-flow ODE, x += (sigma_next - sigma) * v with v = noise - x0."""

    def __init__(self, steps: int, start: int, mu: float):
        sigmas = flow_sigmas(steps, mu)
        super().__init__("Flow", "V5.1", sigmas[:-1] * NUM_TRAIN_TIMESTEPS, start)
        self.sigmas = sigmas[start:]

    def add_noise(self, x0, noise, i):
        sigma = _per_sample(self.sigmas[i], x0)
        return sigma * noise + (1.0 - sigma) * x0

    def _step(self, model_output, i, x, generator):
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (x.float() + dt * model_output).to(model_output.dtype)


class _DiscreteSampler(Sampler):
    """Base for the DDPM-family samplers: v-prediction (V4 / V5) or epsilon-prediction (V1-V3)."""

    def __init__(self, name, version, timesteps: list[float], start: int, abar: torch.Tensor):
        super().__init__(name, version, torch.tensor(timesteps), start)
        # Table lookups clamp to 999: V4's steps_offset makes the first timestep 1000 at N = 1000 (diffusers' DDIM
        # and PNDM raise IndexError there); the model is still fed the scheduled value.
        self._int_timesteps = [min(int(t), NUM_TRAIN_TIMESTEPS - 1) for t in timesteps[start:]]
        self.alphas_cumprod = abar
        self.prediction = SCHEDULES[version].prediction

    def add_noise(self, x0, noise, i):
        abar = self.alphas_cumprod.to(x0.dtype)[self._int_timesteps[i]]
        return _per_sample(abar**0.5, x0) * x0 + _per_sample((1 - abar) ** 0.5, x0) * noise


class DDIMSampler(_DiscreteSampler):
    """Deterministic DDIM (eta = 0) on alphas_cumprod, stepping to t - 1000 // N."""

    def __init__(self, version, steps, start, schedule: DiscreteSchedule):
        super().__init__("DDIM", version, _spaced_timesteps(schedule, steps), start, alphas_cumprod(schedule))
        self._stride = NUM_TRAIN_TIMESTEPS // steps
        alpha_to_one = True if schedule.set_alpha_to_one is None else schedule.set_alpha_to_one
        self._final_abar = torch.tensor(1.0, dtype=torch.float32) if alpha_to_one else self.alphas_cumprod[0]
        self._clip_sample = schedule.clip_sample

    def _step(self, model_output, i, x, generator):
        t = self._int_timesteps[i]
        prev = t - self._stride
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else self._final_abar
        beta_t = 1 - abar_t
        if self.prediction == "epsilon":
            x0 = (x - beta_t ** (0.5) * model_output) / abar_t ** (0.5)
            eps = model_output
        else:
            x0 = (abar_t**0.5) * x - (beta_t**0.5) * model_output
            eps = (abar_t**0.5) * model_output + (beta_t**0.5) * x
        if self._clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        return abar_prev ** (0.5) * x0 + (1 - abar_prev) ** (0.5) * eps


class PNDMSampler(_DiscreteSampler):
    """PNDM: four Runge-Kutta (PRK) steps of 3 evaluations each, then linear multistep (PLMS)."""

    order_dependent = True

    def __init__(self, version, steps, start, schedule: DiscreteSchedule):
        # diffusers' PNDMScheduler has no zero-terminal-SNR option: the released V5 config's flag is ignored.
        abar = alphas_cumprod(schedule, zero_terminal_snr=False)
        ascending = list(reversed(_spaced_timesteps(schedule, steps)))
        half = NUM_TRAIN_TIMESTEPS // steps // 2
        pairs = [t + d for t in ascending[-4:] for d in (0, half)]  # each of the last 4 plus its midpoint
        prk = [t for t in pairs[:-1] for _ in (0, 1)][1:-1][::-1]
        plms = ascending[:-3][::-1]
        super().__init__("PNDM", version, prk + plms, start, abar)
        self._prk = [min(t, NUM_TRAIN_TIMESTEPS - 1) for t in prk]  # lookups clamp, as _int_timesteps
        self._stride = NUM_TRAIN_TIMESTEPS // steps
        self._final_abar = (
            torch.tensor(1.0, dtype=torch.float32) if schedule.set_alpha_to_one else self.alphas_cumprod[0]
        )
        self._eps_history: list[torch.Tensor] = []  # past model outputs at the PRK/PLMS anchor points
        self._rk_sum = 0  # running Runge-Kutta weighted sum of model outputs
        self._anchor: torch.Tensor | None = None  # sample at the start of the current RK / first PLMS step

    def _step(self, model_output, i, x, generator):
        t = self._int_timesteps[i]
        if i < len(self._prk):
            return self._step_prk(model_output, i, t, x)
        return self._step_plms(model_output, i, t, x)

    def _step_prk(self, model_output, counter, t, x):
        """One of the 4 evaluations of a Runge-Kutta step (weights 1/6, 1/3, 1/3, 1/6)."""
        prev = t - (0 if counter % 2 else self._stride // 2)
        t = self._prk[counter // 4 * 4]  # all four evaluations step from the RK step's start timestep
        stage = counter % 4
        if stage == 0:
            self._rk_sum += 1 / 6 * model_output
            self._eps_history.append(model_output)
            self._anchor = x
        elif stage in (1, 2):
            self._rk_sum += 1 / 3 * model_output
        else:
            model_output = self._rk_sum + 1 / 6 * model_output
            self._rk_sum = 0
        anchor = self._anchor if self._anchor is not None else x
        return self._prev_sample(anchor, t, prev, model_output)

    def _step_plms(self, model_output, counter, t, x):
        """Adams-Bashforth step using up to four past model outputs."""
        prev = t - self._stride
        self._eps_history = self._eps_history[-3:] + [model_output]
        # The 12 PRK evaluations leave 3 anchor outputs, so PLMS always has 4 and runs at full (4th) order.
        e1, e2, e3, e4 = self._eps_history[-1], self._eps_history[-2], self._eps_history[-3], self._eps_history[-4]
        model_output = (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4)
        return self._prev_sample(x, t, prev, model_output)

    def _prev_sample(self, x, t, prev, model_output):
        """PNDM's transfer from t to prev given the model output (formula (9) of the PNDM paper)."""
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else self._final_abar
        beta_t, beta_prev = 1 - abar_t, 1 - abar_prev
        eps = model_output
        if self.prediction == "v_prediction":
            eps = (abar_t**0.5) * model_output + (beta_t**0.5) * x
        x_coeff = (abar_prev / abar_t) ** (0.5)
        eps_denominator = abar_t * beta_prev ** (0.5) + (abar_t * beta_t * abar_prev) ** (0.5)
        return x_coeff * x - (abar_prev - abar_t) * eps / eps_denominator


class _SigmaSampler(_DiscreteSampler):
    """Base for samplers that work on sigma = sqrt((1 - abar) / abar) (Euler, Euler A, DPM++)."""

    def __init__(self, name, version, timesteps, start, schedule: DiscreteSchedule):
        table = _karras_sigmas_table(schedule)
        abar = alphas_cumprod(schedule)
        super().__init__(name, version, timesteps, start, abar)
        # V4's steps_offset can push the first timestep to 1000 (N = 1000, or DPM++ with N = 999); diffusers
        # interpolates there with np.interp, which holds the last table value (and between entries for V1-V3's
        # fractional "linspace" timesteps).
        full = torch.cat([_interpolate(table, timesteps), torch.zeros(1, dtype=torch.float32)])
        self._max_sigma = full.max()
        self.sigmas = full[start:]

    def _x0(self, model_output, i, x):
        """The model's clean-sample estimate from its v or epsilon prediction, in the Karras parameterisation."""
        sigma = self.sigmas[i]
        if self.prediction == "epsilon":
            return x - sigma * model_output
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))


class EulerSampler(_SigmaSampler):
    """Euler ("Euler") and Euler ancestral ("Euler A") on the Karras-style sigmas."""

    def __init__(self, version, steps, start, schedule: DiscreteSchedule, ancestral: bool):
        name = "Euler A" if ancestral else "Euler"
        spacing = schedule.spacing_of_sigma_samplers
        super().__init__(name, version, _spaced_timesteps(schedule, steps, spacing), start, schedule)
        self.ancestral = ancestral
        # Leading spacing never reaches the last training step, so the start noise is sqrt(sigma_max^2 + 1).
        top = self._max_sigma if spacing in ("trailing", "linspace") else (self._max_sigma**2 + 1) ** 0.5
        self.init_noise_sigma = top.item()

    def scale_model_input(self, x, i):
        return x / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def add_noise(self, x0, noise, i):
        return x0 + noise * _per_sample(self.sigmas[i], x0)

    def _step(self, model_output, i, x, generator):
        x = x.float()
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self._x0(model_output, i, x)
        derivative = (x - x0) / sigma
        if not self.ancestral:
            return (x + derivative * (sigma_next - sigma)).to(model_output.dtype)
        # Step down to sigma_down deterministically, then add fresh noise of std sigma_up.
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + derivative * (sigma_down - sigma)
        x = x + _randn(model_output, generator) * sigma_up
        return x.to(model_output.dtype)


class DPMSolver2MSampler(_SigmaSampler):
    """DPM-Solver++(2M), midpoint variant; first-order on the first and on the last step."""

    order_dependent = True

    def __init__(self, version, steps, start, schedule: DiscreteSchedule):
        super().__init__("DPM++", version, _dpm_timesteps(schedule, steps), start, schedule)
        self._last_x0: torch.Tensor | None = None

    def add_noise(self, x0, noise, i):
        alpha, sigma = self._alpha_sigma(_per_sample(self.sigmas[i], x0))
        return alpha * x0 + sigma * noise

    @staticmethod
    def _alpha_sigma(sigma):
        """(alpha_t, sigma_t) of the variance-preserving process with Karras sigma."""
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def _lambda(self, i):
        """Half log-SNR at run step i, plus its alpha_t and sigma_t."""
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        return torch.log(alpha) - torch.log(sigma), alpha, sigma

    def _step(self, model_output, i, x, generator):
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        if self.prediction == "epsilon":
            x0 = (x - sigma_s * model_output) / alpha_s
        else:
            x0 = alpha_s * x - sigma_s * model_output
        x = x.float()
        lambda_t, alpha_t, sigma_t = self._lambda(i + 1)
        lambda_s0, _, sigma_s0 = self._lambda(i)
        h = lambda_t - lambda_s0
        first_order = self._last_x0 is None or i == self.num_steps - 1  # final sigma is 0: always first order
        if first_order:
            out = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            lambda_s1 = self._lambda(i - 1)[0]
            d1 = (1.0 / ((lambda_s0 - lambda_s1) / h)) * (x0 - self._last_x0)
            out = (
                (sigma_t / sigma_s0) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        self._last_x0 = x0
        return out.to(model_output.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------------------------


def _check_request(name: str, version: str, steps: int, strength: float, shift: float | None) -> int:
    """Validate a sampler request; returns the number of schedule steps skipped by strength."""
    if version not in SAMPLERS:
        raise ValueError(f"unknown EasyAnimate version {version!r}; valid: {', '.join(VERSIONS)}")
    valid = SAMPLERS[version]
    if name not in valid:
        known = "unknown sampler" if all(name not in names for names in SAMPLERS.values()) else "sampler"
        suffix = "" if known == "unknown sampler" else f" is not available for {version}"
        raise ValueError(f"{known} {name!r}{suffix}; valid for {version}: {', '.join(valid)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be an integer in [1, {NUM_TRAIN_TIMESTEPS}], got {steps!r}")
    if name == "PNDM" and steps < 4:
        raise ValueError(f"PNDM needs at least 4 steps (its Runge-Kutta warm-up), got {steps}")
    if shift is not None and name != "Flow":
        raise ValueError(f"shift applies to the Flow sampler only, not {name!r}")
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0):
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(f"strength {strength} keeps no step of {steps}; use at least {1 / steps:.4g}")
    return steps - kept


def make_sampler(name: str, version: str, steps: int, *, strength: float = 1.0, shift: float | None = None) -> Sampler:
    """Build sampler ``name`` for ``version`` with ``steps`` schedule steps; strength < 1 keeps the last int(N*s).

    ``shift`` (Flow only) overrides the released time shift exp(mu) = e: sigma' = shift*sigma / (1 + (shift-1)*sigma).
    """
    start = _check_request(name, version, steps, strength, shift)
    schedule = SCHEDULES[version]
    if name == "Flow":
        return FlowSampler(steps, start, schedule.mu if shift is None else math.log(shift))
    if name in ("Euler", "Euler A"):
        return EulerSampler(version, steps, start, schedule, ancestral=name == "Euler A")
    if name == "DPM++":
        return DPMSolver2MSampler(version, steps, start, schedule)
    if name == "PNDM":
        return PNDMSampler(version, steps, start, schedule)
    return DDIMSampler(version, steps, start, schedule)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class TrainingExample(NamedTuple):
    """What one training step feeds the model and regresses it onto."""

    noisy: torch.Tensor  # model input latents
    target: torch.Tensor  # the regression target for the model output
    model_timestep: torch.Tensor  # float32 [B], the timestep to pass to the model


def training_timesteps(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 [batch] training timesteps drawn uniformly from [0, 1000)."""
    return torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)


def training_target(version: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> TrainingExample:
    """Noisy input, target and model timestep for training timesteps t (int [B] in [0, 1000)).

    V5.1 (flow): sigma = (t + 1) / 1000 (the unshifted table 0.001 ... 1), x = (1 - sigma) x0 + sigma noise,
    target noise - x0, model timestep sigma * 1000.
    V4 / V5 (v-prediction): x = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, target v = sqrt(abar_t) noise -
    sqrt(1 - abar_t) x0, model timestep t; V5's betas are rescaled to zero terminal SNR.
    V1-V3 (epsilon prediction): the same noisy input on their linear betas, target the noise (the mean part of the
    official learned-sigma objective).
    """
    if version not in SCHEDULES:
        raise ValueError(f"unknown EasyAnimate version {version!r}; valid: {', '.join(VERSIONS)}")
    t = t.to(torch.int64)
    if t.numel() and not (0 <= int(t.min()) and int(t.max()) < NUM_TRAIN_TIMESTEPS):
        raise ValueError(f"training timesteps must lie in [0, {NUM_TRAIN_TIMESTEPS})")
    schedule = SCHEDULES[version]
    if isinstance(schedule, FlowSchedule):
        sigma_table = (t + 1).float() / NUM_TRAIN_TIMESTEPS
        sigma = sigma_table.to(x0.device, x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        noisy = (1.0 - sigma) * x0 + sigma * noise
        return TrainingExample(noisy, noise - x0, sigma_table * NUM_TRAIN_TIMESTEPS)
    abar = alphas_cumprod(schedule).to(x0.dtype)[t.cpu()].to(x0.device).reshape(-1, *([1] * (x0.dim() - 1)))
    signal, noise_level = abar**0.5, (1 - abar) ** 0.5
    target = noise if schedule.prediction == "epsilon" else signal * noise - noise_level * x0
    return TrainingExample(signal * x0 + noise_level * noise, target, t.float())
