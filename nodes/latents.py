"""Latent nodes: the empty video latent (V5.1 ... V1) and the V5.1 Flow sigmas."""

from __future__ import annotations

import comfy.model_management as mm
import torch

from easyanimate_core.sampling import DEFAULTS, make_sampler
from easyanimate_core.vae import VAE_V51

from .common import CATEGORY, VAE_CONFIGS, frame_rule


def video_size_error(width: int, height: int, frames: int, versions) -> str | None:
    """Why a video size breaks the frame / size rules of ``versions`` (naming the nearest valid values), or None."""
    for version in versions:
        vae = VAE_CONFIGS[version]
        m = vae.pixel_multiple
        for name, size in (("width", width), ("height", height)):
            if size % m or size <= 0:
                nearest = " or ".join(str(v) for v in dict.fromkeys((max(m, size // m * m), (size // m + 1) * m)))
                return f"{name} {size} is not a multiple of {m}; nearest valid: {nearest}"
        step, offset = frame_rule(vae)
        if frames < 1 or ((frames - offset) % step and frames != 1):
            lower = max(step if offset == 0 else 1, (frames - offset) // step * step + offset)
            upper = ((frames - offset) // step + 1) * step + offset
            rule = f"{step}k+{offset}" if offset else f"a multiple of {step}"
            return f"frames {frames} must be {rule} for {version}; nearest valid: {lower} or {upper}"
    return None


def empty_video_latent(vae, width: int, height: int, frames: int, batch_size: int) -> dict:
    """A zero LATENT [B, C, T, H / s, W / s] with the VAE config's channels and latent frames for ``frames``."""
    s = vae.spatial_compression
    shape = (batch_size, vae.latent_channels, vae.latent_frames(frames), height // s, width // s)
    return {"samples": torch.zeros(shape, device=mm.intermediate_device())}


class EasyAnimateEmptyLatentVideo:
    """An empty video LATENT for the EasyAnimate MODEL: [B, 16, (frames - 1) / 4 + 1, H / 8, W / 8] for V5 / V5.1,
    [B, 4, frames / 4, H / 8, W / 8] for V4 / V3 (slice VAE), [B, 4, frames / 3, ...] for V2, [B, 4, frames, ...]
    for V1."""

    @classmethod
    def INPUT_TYPES(cls):
        vae = VAE_V51
        step, multiple = vae.temporal_compression, vae.pixel_multiple
        size = f"Pixels, a multiple of {multiple}."
        frames = (
            f"Video frames: V5.1 / V5 {step}k+1 (1, 5, 9, ..., 49); V4 / V3 a multiple of 8 (8, 16, ..., 144); "
            "V2 a multiple of 9; V1 any."
        )
        return {
            "required": {
                "version": (list(VAE_CONFIGS), {"tooltip": "The model version (sets the size and frame rules)."}),
                "width": ("INT", {"default": 672, "min": multiple, "max": 4096, "step": multiple, "tooltip": size}),
                "height": ("INT", {"default": 384, "min": multiple, "max": 4096, "step": multiple, "tooltip": size}),
                "frames": ("INT", {"default": 49, "min": 1, "max": 1025, "step": step, "tooltip": frames}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Videos per run."}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, version, width, height, frames):
        if version not in VAE_CONFIGS:
            return f"unknown version {version!r}; choose one of {list(VAE_CONFIGS)}"
        return video_size_error(width, height, frames, [version]) or True

    def generate(self, version, width, height, frames, batch_size):
        return (empty_video_latent(VAE_CONFIGS[version], width, height, frames, batch_size),)


class EasyAnimateFlowSigmas:
    """The released V5.1 Flow schedule as SIGMAS, for SamplerCustomAdvanced to reproduce the official sampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": ("INT", {"default": DEFAULTS["V5.1"][1], "min": 1, "max": 1000, "tooltip": "Sampling steps."}),
                "denoise": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Strength (1: from noise)."},
                ),
            }
        }

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    def get_sigmas(self, steps, denoise):
        return (released_sigmas("V5.1", steps, denoise),)


def released_sigmas(version: str, steps: int, denoise: float, model_sampling=None, shift: float | None = None):
    """The version's released schedule as ComfyUI SIGMAS (its default sampler stepping through them reproduces the
    official one); ``denoise`` is the official strength: the last int(steps * denoise) steps of the full schedule.

    Flow (V5.1): core's shifted sigmas (``shift`` overrides e). DDIM (V5): the model's own sigma table at the
    released trailing timesteps, then 0; ComfyUI's "ddim" (Euler in sigma space) is deterministic DDIM on them,
    equal to the official steps whenever the step count divides 1000 (the released 50 does).
    """
    if denoise <= 0.0:
        return torch.zeros(0)  # as ComfyUI's schedulers: nothing to sample
    name = DEFAULTS[version][0]
    sampler = make_sampler(name, version, steps, strength=denoise, shift=shift if name == "Flow" else None)
    if name == "Flow":
        return sampler.sigmas.clone()
    if model_sampling is None:
        raise ValueError(f"the {version} schedule in ComfyUI sigmas needs the MODEL's model_sampling")
    sigmas = model_sampling.sigma(sampler.timesteps).float().cpu()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


NODE_CLASS_MAPPINGS = {
    "EasyAnimateEmptyLatentVideo": EasyAnimateEmptyLatentVideo,
    "EasyAnimateFlowSigmas": EasyAnimateFlowSigmas,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateEmptyLatentVideo": "EasyAnimate Empty Latent Video",
    "EasyAnimateFlowSigmas": "EasyAnimate Flow Sigmas (V5.1)",
}
