"""EasyAnimate Sampler: one node with each version's released settings, on ComfyUI's own sampling.

It is KSampler (``comfy.sample.sample``: same noise, CFG guider, samplers, progress bar and latent previews) with
"default" choices resolved from the MODEL's version: the released sampler (V5.1 Flow -> ComfyUI's euler, V5 DDIM
-> ComfyUI's ddim, V4 Euler -> ComfyUI's euler, V1-V3 DPM++ -> ComfyUI's dpmpp_2m) on the released schedule
(``latents.released_sigmas``), where
``denoise`` is the official strength. With a ComfyUI scheduler chosen it samples exactly as the stock KSampler
with the same settings.
The conditioning is checked against the model before the model is loaded.
"""

from __future__ import annotations

import math

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from easyanimate_core.sampling import DEFAULTS, SCHEDULES, make_sampler

from .common import CATEGORY, NATIVE_VERSIONS
from .latents import released_sigmas
from .native_model import EasyAnimateNet, conditioning_error

DEFAULT = "default"
# The official sampler names of the released defaults -> the ComfyUI sampler computing the same steps.
COMFY_SAMPLERS = {"Flow": "euler", "DDIM": "ddim", "Euler": "euler", "DPM++": "dpmpp_2m"}


def _released(field: int) -> str:
    """The released value of one DEFAULTS field per native version, for tooltips ("V5.1: 50, V5: 50")."""
    return ", ".join(f"{v}: {DEFAULTS[v][field]}" for v in NATIVE_VERSIONS)


def easyanimate_version(model) -> str:
    """The EasyAnimate version of a MODEL, or a clear error for any other model."""
    if not isinstance(getattr(model.model, "diffusion_model", None), EasyAnimateNet):
        raise ValueError("this MODEL is not an EasyAnimate model; sample it with ComfyUI's KSampler")
    return model.model.model_config.version


def check_conditioning(model, positive, negative, latent_shape) -> None:
    """Refuse conditioning the model cannot take (wrong model variant, text encoder or video size) up front."""
    net = model.model.diffusion_model
    for name, conditioning in (("positive", positive), ("negative", negative)):
        for embeds, extras in conditioning:
            error = conditioning_error(net, {**extras, "cross_attn": embeds}, latent_shape)
            if error:
                raise ValueError(f"{name} conditioning: {error}")


def released_start_scale(version: str, steps: int, sigmas, model_sampling) -> float:
    """Factor on ComfyUI's noise that makes its start latents the released sampler's, from pure noise.

    ComfyUI starts at sigma_0 * noise unless sigma_0 is the model's largest sigma (then sqrt(sigma_0^2 + 1) *
    noise). The released V4 Euler (leading spacing) never reaches the largest sigma yet starts from
    ``init_noise_sigma`` = sqrt(sigma_0^2 + 1): the factor is that over sigma_0 (1 for every other version).
    """
    if getattr(SCHEDULES[version], "spacing", None) != "leading":
        return 1.0
    sigma_0 = float(sigmas[0])
    if math.isclose(sigma_0, float(model_sampling.sigma_max), rel_tol=1e-5):  # ComfyUI's own largest-sigma test
        return 1.0
    return make_sampler(DEFAULTS[version][0], version, steps).init_noise_sigma / sigma_0


def with_shift(model, version: str, shift: float):
    """The model with its flow shift replaced, as ComfyUI's ModelSamplingSD3 node does (V5.1 only)."""
    if DEFAULTS[version][0] != "Flow":
        raise ValueError(f"shift applies to flow-matching models (V5.1); {version} has none: set shift to 0")
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    return ModelSamplingSD3().patch(model, shift, multiplier=1000)[0]


class EasyAnimateSampler:
    """KSampler with EasyAnimate's released defaults: "default" picks the version's sampler, schedule and shift."""

    @classmethod
    def INPUT_TYPES(cls):
        steps, cfg = DEFAULTS["V5.1"][1], DEFAULTS["V5.1"][2]
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An EasyAnimate MODEL (EasyAnimate Model Loader)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt (or a conditioning node's positive)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt (or a conditioning node's negative)."}),
                "latent": ("LATENT", {"tooltip": "Empty latent, or a conditioning node's latent."}),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "The noise seed.",
                    },
                ),
                "steps": (
                    "INT",
                    {"default": steps, "min": 1, "max": 1000, "tooltip": f"Sampling steps; released: {_released(1)}."},
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": cfg,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": f"Classifier-free guidance; released: {_released(2)}.",
                    },
                ),
                "sampler_name": (
                    [DEFAULT, *comfy.samplers.KSampler.SAMPLERS],
                    {
                        "tooltip": f"default: the released sampler ({_released(0)}; Flow, Euler = euler, DDIM = ddim, "
                        "DPM++ = dpmpp_2m)."
                    },
                ),
                "scheduler": (
                    [DEFAULT, *comfy.samplers.KSampler.SCHEDULERS],
                    {"tooltip": "default: the released schedule (denoise = the official strength)."},
                ),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "1: from noise. Below 1: video-to-video strength (official default 0.7).",
                    },
                ),
                "shift": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.01,
                        "tooltip": "Flow shift for V5.1; 0 keeps the model's (released: e = 2.718).",
                    },
                ),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, steps, denoise, scheduler):
        if scheduler == DEFAULT and denoise > 0 and int(steps * denoise) < 1:
            return f"denoise {denoise} keeps no step of {steps}: raise denoise to {1 / steps:.4g} or more, or add steps"
        return True

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, denoise, shift):
        version = easyanimate_version(model)
        latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        check_conditioning(model, positive, negative, latent_image.shape)
        if shift > 0:
            model = with_shift(model, version, shift)
        if sampler_name == DEFAULT:
            sampler_name = COMFY_SAMPLERS[DEFAULTS[version][0]]
        sigmas = None
        if scheduler == DEFAULT:
            model_sampling = model.get_model_object("model_sampling")
            flow_shift = getattr(model_sampling, "shift", None) if DEFAULTS[version][0] == "Flow" else None
            sigmas = released_sigmas(version, steps, denoise, model_sampling, flow_shift)
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
        if sigmas is not None and denoise == 1.0 and len(sigmas) > 1:
            noise = noise * released_start_scale(version, steps, sigmas, model.get_model_object("model_sampling"))
        callback = latent_preview.prepare_callback(model, steps if sigmas is None else max(len(sigmas) - 1, 1))
        samples = comfy.sample.sample(
            model,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            latent_image,
            denoise=denoise,
            noise_mask=latent.get("noise_mask"),
            sigmas=sigmas,
            callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed,
        )
        out = latent.copy()
        out["samples"] = samples
        return (out,)


NODE_CLASS_MAPPINGS = {"EasyAnimateSampler": EasyAnimateSampler}

NODE_DISPLAY_NAME_MAPPINGS = {"EasyAnimateSampler": "EasyAnimate Sampler"}
