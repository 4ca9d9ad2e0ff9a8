"""Loaders of the transformer (native MODEL) and text encoders, text encode, and the LoRA loader."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch

from easyanimate_core.loading import inspect_checkpoint
from easyanimate_core.lora import read_lora
from easyanimate_core.text_encoders import TextEncoders, load_text_encoders

from .common import CATEGORY, folder_input, model_folder_path
from .native_model import WEIGHT_DTYPES, EasyAnimateNet, load_native_model, lora_patches


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
    "EasyAnimateTextEncoderLoader": EasyAnimateTextEncoderLoader,
    "EasyAnimateTextEncode": EasyAnimateTextEncode,
    "EasyAnimateLoraLoader": EasyAnimateLoraLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateModelLoader": "EasyAnimate Model Loader",
    "EasyAnimateTextEncoderLoader": "EasyAnimate Text Encoder Loader",
    "EasyAnimateTextEncode": "EasyAnimate Text Encode",
    "EasyAnimateLoraLoader": "EasyAnimate LoRA Loader",
}
