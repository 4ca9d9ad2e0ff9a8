"""The EasyAnimate VAE in ComfyUI: loader and decode."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import torch

from easyanimate_core.loading import load_vae
from easyanimate_core.vae import MagvitVAE

from .common import CATEGORY, folder_input, model_folder_path


class EasyAnimateVAEHandle:
    """Our MagViT VAE in a ModelPatcher, so ComfyUI loads and offloads it."""

    def __init__(self, vae: MagvitVAE):
        self.vae = vae
        self.patcher = comfy.model_patcher.ModelPatcher(
            vae, load_device=mm.vae_device(), offload_device=mm.vae_offload_device()
        )


class EasyAnimateVAELoader:
    """Load the MagViT VAE of an EasyAnimate checkpoint folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_folder": folder_input("vae", "The EasyAnimate checkpoint folder.")}}

    RETURN_TYPES = ("EASYANIMATE_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model_folder):
        vae = load_vae(model_folder_path(model_folder), device=mm.vae_offload_device())
        return (EasyAnimateVAEHandle(vae),)


class EasyAnimateVAEDecode:
    """Decode a video LATENT with the EasyAnimate VAE to IMAGE frames [frames, H, W, 3]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "Video latents [B, 16, T, h, w] from KSampler."}),
                "vae": ("EASYANIMATE_VAE", {"tooltip": "From EasyAnimate VAE Loader."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples, vae):
        latents = samples["samples"]
        if latents.ndim != 5 or latents.shape[1] != vae.vae.config.latent_channels:
            raise ValueError(
                f"expected video latents [B, {vae.vae.config.latent_channels}, T, h, w], got {list(latents.shape)}"
            )
        mm.load_models_gpu([vae.patcher])
        device = vae.patcher.load_device
        bar = comfy.utils.ProgressBar(latents.shape[2])
        # LATENT holds VAE-space latents (KSampler's process_out already divided by the scaling factor).
        with torch.no_grad():
            video = vae.vae.decode(latents.to(device), progress=lambda done, total: bar.update_absolute(done, total))
        frames = ((video.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)  # [B, F, H, W, 3]
        return (frames.reshape(-1, *frames.shape[2:]).to(mm.intermediate_device()),)


NODE_CLASS_MAPPINGS = {
    "EasyAnimateVAELoader": EasyAnimateVAELoader,
    "EasyAnimateVAEDecode": EasyAnimateVAEDecode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateVAELoader": "EasyAnimate VAE Loader",
    "EasyAnimateVAEDecode": "EasyAnimate VAE Decode",
}
