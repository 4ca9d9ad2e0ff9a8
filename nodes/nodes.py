"""The EasyAnimate nodes: model / VAE / text-encoder loaders, text encode, empty latent video, VAE decode."""

from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from easyanimate_core.loading import inspect_checkpoint, load_vae
from easyanimate_core.lora import read_lora
from easyanimate_core.sampling import DEFAULTS, make_sampler
from easyanimate_core.text_encoders import TextEncoders, load_text_encoders
from easyanimate_core.vae import VAE_V5, VAE_V51, MagvitVAE

from .native_model import WEIGHT_DTYPES, EasyAnimateLatentFormat, EasyAnimateNet, load_native_model, lora_patches

CATEGORY = "EasyAnimate"
FOLDER = "EasyAnimate"
VAE_CONFIGS = {"V5.1": VAE_V51, "V5": VAE_V5}

folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)


def model_folders(part: str) -> list[str]:
    """Model folders under models/EasyAnimate/ that have a ``part`` subfolder (e.g. "transformer")."""
    names = set()
    for root in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(root):
            names.update(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n, part)))
    return sorted(names)


def model_folder_path(name: str) -> Path:
    """The full path of a folder listed by ``model_folders``."""
    for root in folder_paths.get_folder_paths(FOLDER):
        path = Path(root) / name
        if path.is_dir():
            return path
    raise FileNotFoundError(f"no folder {name!r} under {folder_paths.get_folder_paths(FOLDER)}")


def folder_input(part: str, tooltip: str) -> tuple:
    names = model_folders(part)
    return (names, {"tooltip": tooltip + f" Folders under models/{FOLDER}/ with a {part}/ subfolder."})


class EasyAnimateModelLoader:
    """Load an EasyAnimate V5 / V5.1 transformer as a native MODEL for KSampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_folder": folder_input("transformer", "The EasyAnimate checkpoint folder."),
                "weight_dtype": (list(WEIGHT_DTYPES), {"tooltip": "Storage dtype of the weights; default picks one."}),
            }
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model_folder, weight_dtype):
        patcher = load_native_model(model_folder_path(model_folder), weight_dtype)
        return (patcher, patcher.model.info.summary())


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


class EasyAnimateTextEncoderLoader:
    """Load the text encoder(s) of an EasyAnimate checkpoint folder (Qwen2-VL for V5.1, BERT + mT5 for V5)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_folder": folder_input("text_encoder", "The EasyAnimate checkpoint folder.")}}

    RETURN_TYPES = ("EASYANIMATE_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model_folder):
        root = model_folder_path(model_folder)
        # BERT + mT5 serve V4 (with masks) and V5 (without): the folder's transformer says which.
        version = inspect_checkpoint(root, "transformer").version if (root / "transformer").is_dir() else None
        if version not in ("V5", "V5.1"):
            raise ValueError(f"{root}: the text-encoder loader takes V5 / V5.1 folders, this one is {version}")
        device = mm.text_encoder_offload_device()
        encoders = load_text_encoders(root, version, dtype=mm.text_encoder_dtype(), device=device)
        return (EasyAnimateTextEncoderHandle(encoders),)


class EasyAnimateTextEncoderHandle:
    """Our TextEncoders with their torch modules in one ModelPatcher (offloaded by ComfyUI after use)."""

    def __init__(self, encoders: TextEncoders):
        self.encoders = encoders
        modules = torch.nn.ModuleList([m for m in (encoders.text_encoder, encoders.text_encoder_2) if m is not None])
        self.patcher = comfy.model_patcher.ModelPatcher(
            modules, load_device=mm.text_encoder_device(), offload_device=mm.text_encoder_offload_device()
        )


class EasyAnimateTextEncode:
    """Encode a prompt to CONDITIONING for the EasyAnimate MODEL (use two for positive and negative)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("EASYANIMATE_TEXT_ENCODER", {"tooltip": "From EasyAnimate Text Encoder Loader."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, text_encoder, text):
        mm.load_models_gpu([text_encoder.patcher])
        embeds = text_encoder.encoders.encode_texts([text])
        out = mm.intermediate_device()
        extras = {}
        if embeds.embeds_2 is not None:  # V5's mT5 stream, passed to the model through extra_conds
            extras["easyanimate_text_2"] = embeds.embeds_2.to(out)
        return ([[embeds.embeds.to(out), extras]],)


class EasyAnimateEmptyLatentVideo:
    """An empty video LATENT [B, 16, (frames - 1) / 4 + 1, H / 8, W / 8] for the EasyAnimate MODEL."""

    @classmethod
    def INPUT_TYPES(cls):
        vae = VAE_V51
        step, multiple = vae.temporal_compression, vae.pixel_multiple
        size, frames = f"Pixels, a multiple of {multiple}.", f"Video frames, {step}k+1 (1, 5, 9, ..., 49)."
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
        vae = VAE_CONFIGS.get(version)
        if vae is None:
            return f"unknown version {version!r}; choose one of {list(VAE_CONFIGS)}"
        m, step = vae.pixel_multiple, vae.temporal_compression
        for name, size in (("width", width), ("height", height)):
            if size % m or size <= 0:
                nearest = " or ".join(str(v) for v in dict.fromkeys((max(m, size // m * m), (size // m + 1) * m)))
                return f"{name} {size} is not a multiple of {m}; nearest valid: {nearest}"
        if frames < 1 or (frames - 1) % step:
            lower, upper = max(1, (frames - 1) // step * step + 1), ((frames - 1) // step + 1) * step + 1
            return f"frames {frames} must be {step}k+1 for {version}; nearest valid: {lower} or {upper}"
        return True

    def generate(self, version, width, height, frames, batch_size):
        vae = VAE_CONFIGS[version]
        s, t = vae.spatial_compression, vae.temporal_compression
        shape = (batch_size, EasyAnimateLatentFormat.latent_channels, (frames - 1) // t + 1, height // s, width // s)
        return ({"samples": torch.zeros(shape, device=mm.intermediate_device())},)


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
        if denoise <= 0.0:
            return (torch.zeros(0),)  # as ComfyUI's schedulers: nothing to sample
        # The official pipeline's strength: the last int(steps * denoise) steps of the full schedule.
        return (make_sampler("Flow", "V5.1", steps, strength=denoise).sigmas.clone(),)


class EasyAnimateLoraLoader:
    """Apply a LoRA (official, peft or diffusers layout) to an EasyAnimate MODEL as weight patches."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An EasyAnimate MODEL (from EasyAnimate Model Loader)."}),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A .safetensors LoRA in loras/."}),
                "strength": (
                    "FLOAT",
                    {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": "How strongly to apply it."},
                ),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, lora_name, strength):
        net = model.model.diffusion_model
        if not isinstance(net, EasyAnimateNet):
            raise ValueError("this MODEL is not an EasyAnimate model; use ComfyUI's LoraLoaderModelOnly for it")
        if strength == 0:
            return (model,)
        lora = read_lora(folder_paths.get_full_path_or_raise("loras", lora_name), net.transformer)
        patched = model.clone()
        patched.add_patches(lora_patches(lora), strength)
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "EasyAnimateModelLoader": EasyAnimateModelLoader,
    "EasyAnimateVAELoader": EasyAnimateVAELoader,
    "EasyAnimateVAEDecode": EasyAnimateVAEDecode,
    "EasyAnimateTextEncoderLoader": EasyAnimateTextEncoderLoader,
    "EasyAnimateTextEncode": EasyAnimateTextEncode,
    "EasyAnimateEmptyLatentVideo": EasyAnimateEmptyLatentVideo,
    "EasyAnimateFlowSigmas": EasyAnimateFlowSigmas,
    "EasyAnimateLoraLoader": EasyAnimateLoraLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateModelLoader": "EasyAnimate Model Loader",
    "EasyAnimateVAELoader": "EasyAnimate VAE Loader",
    "EasyAnimateVAEDecode": "EasyAnimate VAE Decode",
    "EasyAnimateTextEncoderLoader": "EasyAnimate Text Encoder Loader",
    "EasyAnimateTextEncode": "EasyAnimate Text Encode",
    "EasyAnimateEmptyLatentVideo": "EasyAnimate Empty Latent Video",
    "EasyAnimateFlowSigmas": "EasyAnimate Flow Sigmas (V5.1)",
    "EasyAnimateLoraLoader": "EasyAnimate LoRA Loader",
}
