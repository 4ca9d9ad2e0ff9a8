"""Loaders of the transformer (native MODEL) and text encoders, text encode, and the LoRA loader."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from safetensors import safe_open

from easyanimate_core.attention import BACKENDS, attention_backend
from easyanimate_core.loading import check_safetensors, inspect_checkpoint
from easyanimate_core.lora import read_lora
from easyanimate_core.text_encoders import TextEncoders, load_text_encoders

from .common import (
    BUNDLED_TOOLTIP,
    CATEGORY,
    NATIVE_VERSIONS,
    bundled_first,
    folder_input,
    model_file,
    model_folder_path,
    model_folders,
    resolve_in_folders,
    validation_error,
)
from .native_model import WEIGHT_DTYPES, EasyAnimateNet, load_native_model, lora_patches

DIFFUSION_MODELS = "diffusion_models"  # ComfyUI's standard folders for single files
TEXT_ENCODERS = "text_encoders"


def _safetensors_in(folder_name: str) -> list[str]:
    """The .safetensors files ComfyUI lists in one of its model folders (pickle files are never loaded)."""
    return [f for f in folder_paths.get_filename_list(folder_name) if f.endswith(".safetensors")]


def _gguf_in(folder_name: str) -> list[str]:
    """The .gguf files in one of ComfyUI's model folders (its own listing takes only its known extensions)."""
    names = set()
    for root in folder_paths.get_folder_paths(folder_name):
        if os.path.isdir(root):
            names.update(p.relative_to(root).as_posix() for p in Path(root).rglob("*.gguf") if p.is_file())
    return sorted(names)


def _header_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, from its header only."""
    with safe_open(path, framework="pt", device="cpu") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _comfy_family(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The ComfyUI model config class that ComfyUI's own detection finds for these tensors (None: none)."""
    try:
        import comfy.model_detection as detection

        state_dict = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
        for prefix in dict.fromkeys((detection.unet_prefix_from_state_dict(state_dict), "")):
            config = detection.model_config_from_unet(state_dict, prefix)
            if config is not None:
                return type(config).__name__
    except Exception:  # detection is best effort: its heuristics index keys that other families lack
        return None
    return None


@functools.lru_cache(maxsize=64)
def _diffusion_model_error(path: str, mtime_ns: int, size: int) -> str | None:
    """Why the single file at ``path`` is not a loadable EasyAnimate transformer (None if it is); cached per version."""
    name = f"{DIFFUSION_MODELS}/{os.path.basename(path)}"
    try:
        info = inspect_checkpoint(path, "transformer")
    except ValueError as error:
        family = None
        try:
            family = _comfy_family(_header_shapes(path))
        except Exception:  # unreadable header: inspect_checkpoint's message says why
            pass
        if family:
            return f"{name} is a {family} checkpoint, not EasyAnimate; use ComfyUI's UNETLoader (Load Diffusion Model)"
        return f"{name} is not an EasyAnimate transformer ({error}); load other models with ComfyUI's UNETLoader"
    return _version_error(name, info.version)


def _version_error(name: str, version: str) -> str | None:
    if version not in NATIVE_VERSIONS:
        return f"{name} is an EasyAnimate {version} transformer; this loader takes {', '.join(NATIVE_VERSIONS)}"
    return None


def _model_path(name: str) -> Path:
    """A model-loader choice: a folder under models/EasyAnimate/, else a file in diffusion_models/."""
    if name in model_folders("transformer"):
        return model_folder_path(name)
    return model_file(DIFFUSION_MODELS, name)


def _model_error(name: str) -> str | None:
    """Why the Model Loader cannot load ``name`` (None if it can), from names and headers only."""
    if name in model_folders("transformer"):
        # Headers only (a truncated or corrupt file is named here, on this node, before anything runs).
        return _version_error(name, inspect_checkpoint(model_folder_path(name), "transformer").version)
    path = resolve_in_folders(DIFFUSION_MODELS, name, Path.is_file)
    if path is None:
        return f"{name!r} is neither a folder under models/EasyAnimate/ nor a file in {DIFFUSION_MODELS}/"
    stat = os.stat(path)
    return _diffusion_model_error(str(path), stat.st_mtime_ns, stat.st_size)


class EasyAnimateModelLoader:
    """Load an EasyAnimate V5 / V5.1 transformer as a native MODEL for KSampler; version and variant are detected."""

    @classmethod
    def INPUT_TYPES(cls):
        choices = model_folders("transformer") + _safetensors_in(DIFFUSION_MODELS) + _gguf_in(DIFFUSION_MODELS)
        tooltip = (
            "An EasyAnimate checkpoint: a folder under models/EasyAnimate/ with a transformer/ subfolder, or a "
            "transformer .safetensors or .gguf file (easyanimate quantize; needs pip install gguf) in "
            "models/diffusion_models/. " + BUNDLED_TOOLTIP
        )
        return {
            "required": {
                "model_folder": (choices, {"tooltip": tooltip}),
                "weight_dtype": (list(WEIGHT_DTYPES), {"tooltip": "Storage dtype of the weights; default picks one."}),
            },
            "optional": {
                "attention": (
                    list(BACKENDS),
                    {
                        "default": "sdpa",
                        "tooltip": "Attention kernel: PyTorch's sdpa, SageAttention or flash-attn (CUDA, half "
                        "precision; when the package is not installed, sdpa runs and the log says so).",
                    },
                ),
            },
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("The EasyAnimate MODEL.", "What was detected: version, variant, size, layout, dtype.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, model_folder):
        return validation_error(lambda: _model_error(model_folder))

    def load(self, model_folder, weight_dtype, attention="sdpa"):
        patcher = load_native_model(_model_path(model_folder), weight_dtype)
        net = patcher.model.diffusion_model
        net.attention, net.attention_name = attention_backend(attention)
        return (patcher, f"{patcher.model.info.summary()}; attention {net.attention_name}")


def _text_encoder_version(root: Path) -> str:
    """ "V5.1" (Qwen2-VL), "V5" / "V4" (BERT + mT5) or "V3" (T5, for V1-V3) for a folder holding text_encoder/ (and
    text_encoder_2/)."""
    # BERT + mT5 serve V4 (with masks) and V5 (without): a model folder's transformer says which. An unreadable
    # transformer is the Model Loader's error (it was given that file): here the text encoder's config decides.
    try:
        version = inspect_checkpoint(root, "transformer").version if (root / "transformer").is_dir() else None
    except ValueError:
        version = None
    if version is not None:
        if version not in NATIVE_VERSIONS:
            takes = ", ".join(NATIVE_VERSIONS)
            raise ValueError(f"{root}: the text-encoder loader takes {takes} folders, not {version}")
        return version
    config = root / "text_encoder" / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type == "qwen2_vl":
        return "V5.1"
    if model_type == "bert":
        # Without a transformer beside it nothing says V4 or V5 (V4 encodes with the masks): take V5, the newer.
        return "V5"
    if model_type == "t5":  # PixArt's T5-v1.1-XXL: V1, V2 and V3 encode prompts the same way
        return "V3"
    raise ValueError(
        f"{root}: the text-encoder loader takes V5.1 (Qwen2-VL), V5 / V4 (BERT + mT5) or V1-V3 (T5) folders "
        f"(text_encoder/config.json: {model_type})"
    )


def _text_encoder_dirs() -> list[str]:
    """Folders in text_encoders/ laid out as in an EasyAnimate model folder (text_encoder/, tokenizer/, ...)."""
    names = set()
    for root in folder_paths.get_folder_paths(TEXT_ENCODERS):
        if os.path.isdir(root):
            names.update(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n, "text_encoder")))
    return sorted(names)


def _text_encoder_dir_path(name: str) -> Path | None:
    return resolve_in_folders(TEXT_ENCODERS, name, lambda path: (path / "text_encoder").is_dir())


QWEN2_VL_KEYS = ("model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.0.self_attn.q_proj.weight")
QWEN25_VL_KEY = "blocks.0.mlp.gate_proj.weight"  # Qwen2.5-VL's vision MLP (Qwen2-VL's has fc1 / fc2)


def _single_text_encoder_error(path: Path) -> str | None:
    """Why a single text-encoder file cannot be loaded for EasyAnimate (None if its config and tokenizer are there)."""
    name = f"{TEXT_ENCODERS}/{path.name}"
    check_safetensors(path)  # a truncated or corrupt file: its name, the problem and the fix
    keys = _header_shapes(str(path))
    if not any(k in keys for k in QWEN2_VL_KEYS) or any(k.endswith(QWEN25_VL_KEY) for k in keys):
        return (
            f"{name} is not a Qwen2-VL text encoder (EasyAnimate V5.1's); V5's BERT + mT5 need a folder "
            f"{TEXT_ENCODERS}/<name>/ with text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/ copied from the "
            "model folder. For other models use ComfyUI's CLIPLoader"
        )
    parts = path.with_suffix("")
    needed = ["config.json", "tokenizer_config.json"]
    missing = [n for n in needed if not (parts / n).is_file()]
    if not ((parts / "tokenizer.json").is_file() or (parts / "vocab.json").is_file()):
        missing.append("tokenizer.json")
    if missing:
        return (
            f"{name} is a single-file Qwen2-VL; its config and tokenizer are not there: put config.json (from the "
            f"model folder's text_encoder/) and the tokenizer files (everything in its tokenizer/ folder) into "
            f"{TEXT_ENCODERS}/{parts.name}/ (missing: {', '.join(missing)}), or load the model folder instead"
        )
    return None


def _load_single_qwen(path: Path, dtype, device) -> TextEncoders:
    """Load a single-file Qwen2-VL through the folder layout core reads (linked, not copied, into a temp folder)."""
    parts = path.with_suffix("")
    root = Path(tempfile.mkdtemp(prefix="easyanimate_te_"))
    try:
        (root / "text_encoder").mkdir()
        try:
            os.symlink(parts / "config.json", root / "text_encoder" / "config.json")
            os.symlink(path, root / "text_encoder" / "model.safetensors")
            os.symlink(parts, root / "tokenizer", target_is_directory=True)
        except OSError as error:  # e.g. Windows without the symlink privilege
            raise ValueError(
                f"could not link {path.name} into the folder layout the loader reads ({error}); make a folder "
                f"{TEXT_ENCODERS}/<name>/ with text_encoder/ (config.json + this file as model.safetensors) and "
                "tokenizer/ instead"
            ) from error
        return load_text_encoders(root, "v5.1", dtype=dtype, device=device)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _text_encoder_root(name: str) -> Path | None:
    """The folder a Text Encoder Loader choice names (None: a single file in text_encoders/)."""
    if name in model_folders("text_encoder"):
        return model_folder_path(name)
    return _text_encoder_dir_path(name)


def _text_encoder_error(name: str) -> str | None:
    """Why the Text Encoder Loader cannot load ``name`` (None if it can), from names and headers only."""
    if _text_encoder_root(name) is not None:
        return None
    path = resolve_in_folders(TEXT_ENCODERS, name, Path.is_file)
    if path is None:
        return f"{name!r} is neither a text-encoder folder nor a file in {TEXT_ENCODERS}/"
    return _single_text_encoder_error(path)


class EasyAnimateTextEncoderLoader:
    """Load the text encoder(s) of an EasyAnimate checkpoint (Qwen2-VL for V5.1, BERT + mT5 for V5)."""

    @classmethod
    def INPUT_TYPES(cls):
        folders = bundled_first(model_folders("text_encoder") + _text_encoder_dirs())
        choices = folders + _safetensors_in(TEXT_ENCODERS)
        tooltip = (
            "A folder under models/EasyAnimate/ or models/text_encoders/ with text_encoder/ and tokenizer/ (V5 also "
            "text_encoder_2/, tokenizer_2/), or a single-file Qwen2-VL in text_encoders/ whose config.json and "
            "tokenizer files are in a folder of the same name beside it. " + BUNDLED_TOOLTIP
        )
        return {"required": {"model_folder": (choices, {"tooltip": tooltip})}}

    RETURN_TYPES = ("EASYANIMATE_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, model_folder):
        return validation_error(lambda: _text_encoder_error(model_folder))

    def load(self, model_folder):
        dtype, device = mm.text_encoder_dtype(), mm.text_encoder_offload_device()
        root = _text_encoder_root(model_folder)
        if root is None:
            path = model_file(TEXT_ENCODERS, model_folder)
            error = _single_text_encoder_error(path)
            if error:
                raise ValueError(error)
            return (EasyAnimateTextEncoderHandle(_load_single_qwen(path, dtype, device)),)
        encoders = load_text_encoders(root, _text_encoder_version(root), dtype=dtype, device=device)
        return (EasyAnimateTextEncoderHandle(encoders),)


def _encoder_patcher(*modules: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over text / image encoder modules, on ComfyUI's text-encoder devices.

    In a ModuleList: ModelPatcher sets ``.device`` on its model, a read-only property of transformers' models.
    """
    return comfy.model_patcher.ModelPatcher(
        torch.nn.ModuleList(modules),
        load_device=mm.text_encoder_device(),
        offload_device=mm.text_encoder_offload_device(),
    )


class EasyAnimateTextEncoderHandle:
    """Our TextEncoders with their torch modules in one ModelPatcher (offloaded by ComfyUI after use)."""

    def __init__(self, encoders: TextEncoders):
        self.encoders = encoders
        self.patcher = _encoder_patcher(*(m for m in (encoders.text_encoder, encoders.text_encoder_2) if m is not None))


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
        if embeds.embeds_2 is not None:  # the mT5 stream of V5 / V4, passed to the model through extra_conds
            extras["easyanimate_text_2"] = embeds.embeds_2.to(out)
        if text_encoder.encoders.version in ("v4", "v3"):  # V4 and V1-V3 read the token masks; V5 never does
            extras["easyanimate_text_mask"] = embeds.mask.to(out)
            if embeds.mask_2 is not None:
                extras["easyanimate_text_2_mask"] = embeds.mask_2.to(out)
        return ([[embeds.embeds.to(out), extras]],)


class EasyAnimateImageEncoderHandle:
    """Our CLIP ImageEncoder with its torch module in a ModelPatcher (offloaded by ComfyUI after use)."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.patcher = _encoder_patcher(encoder.model)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image [H, W, 3] in [0, 1] -> CLIP patch features [1, patches, hidden] (V4) or image embedding [1, 768]
        (V3), on the intermediate device."""
        mm.load_models_gpu([self.patcher])
        return self.encoder.encode(image).to(mm.intermediate_device())


class EasyAnimateImageEncoderLoader:
    """Load the CLIP vision encoder (image_encoder/) of an EasyAnimate V4 or V3 InP model folder."""

    @classmethod
    def INPUT_TYPES(cls):
        tooltip = "A V4 or V3 InP model folder; its image_encoder/ gives the start image's CLIP features."
        return {"required": {"model_folder": folder_input("image_encoder", tooltip)}}

    RETURN_TYPES = ("EASYANIMATE_IMAGE_ENCODER",)
    RETURN_NAMES = ("image_encoder",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model_folder):
        from easyanimate_core.image_encoder import load_image_encoder

        root = model_folder_path(model_folder)
        # V3 conditions on CLIP's projected image embedding, V4 on its patch features: the transformer beside says.
        version = inspect_checkpoint(root, "transformer").version if (root / "transformer").is_dir() else "V4"
        encoder = load_image_encoder(
            root,
            dtype=mm.text_encoder_dtype(),
            device=mm.text_encoder_offload_device(),
            output="image_embeds" if version == "V3" else "patches",
        )
        return (EasyAnimateImageEncoderHandle(encoder),)


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
        lora = read_lora(model_file("loras", lora_name), net.transformer)
        quantized = [path for path in lora if getattr(net.transformer.get_submodule(path), "quant_kind", None)]
        if quantized:
            raise ValueError(
                f"this MODEL keeps {len(quantized)} of the LoRA's layers in GGUF blocks (e.g. {quantized[0]}), which "
                "weight patches cannot change: load the .safetensors model for LoRAs, or quantize a model with the "
                "LoRA merged into it"
            )
        patched = model.clone()
        patched.add_patches(lora_patches(lora), strength)
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "EasyAnimateModelLoader": EasyAnimateModelLoader,
    "EasyAnimateTextEncoderLoader": EasyAnimateTextEncoderLoader,
    "EasyAnimateTextEncode": EasyAnimateTextEncode,
    "EasyAnimateLoraLoader": EasyAnimateLoraLoader,
    "EasyAnimateImageEncoderLoader": EasyAnimateImageEncoderLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateModelLoader": "EasyAnimate Model Loader",
    "EasyAnimateTextEncoderLoader": "EasyAnimate Text Encoder Loader",
    "EasyAnimateTextEncode": "EasyAnimate Text Encode",
    "EasyAnimateLoraLoader": "EasyAnimate LoRA Loader",
    "EasyAnimateImageEncoderLoader": "EasyAnimate Image Encoder Loader (V4 / V3)",
}
