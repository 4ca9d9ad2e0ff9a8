"""The CLIP vision encoder of EasyAnimate V4 and V3 InP (``image_encoder/``), loaded from a checkpoint's folder.

    load_image_encoder(root, dtype=..., device=..., output="patches") -> ImageEncoder
    ImageEncoder.encode(image [H, W, 3] in [0, 1]) -> features [1, L, hidden]   (L = 256 for ViT-L/14 at 224 px)
                                                   or, output="image_embeds" (V3), [1, projection_dim] (768)

The released folder holds a full CLIP ViT-L/14 (vision and text towers) with a CLIPImageProcessor config; V4 uses
the vision tower's ``last_hidden_state`` without the CLS token (spec §1.7). The model comes from ``transformers``
(``CLIPVisionModel``: the vision half of a full CLIP checkpoint, without the projection V4 does not use) with
``local_files_only=True``; pickle weights (the release's ``pytorch_model.bin``) are refused with the one-line
conversion to run once. Preprocessing follows CLIPImageProcessor (shortest side to ``size``, bicubic, centre crop,
normalise with the configured mean/std) in torch, so it does not depend on which image backend transformers picks.
V3 (``output="image_embeds"``) reads the projected pooled embedding of ``CLIPVisionModelWithProjection`` instead, as
its official pipeline does (pipeline_easyanimate_inpaint.py at the V3 release).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from .loading import check_safetensors
from .text_encoders import _dtype_kwargs, _frozen

FOLDER = "image_encoder"
# CLIPImageProcessor defaults (OpenAI CLIP), used where preprocessor_config.json leaves a value out.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
OUTPUTS = ("patches", "image_embeds")  # V4: patch features; V3: the projected image embedding


def check_image_encoder_files(root: str | Path) -> None:
    """Raise ValueError, before any weights are read, if ``root/image_encoder`` cannot be loaded safely."""
    folder = Path(root) / FOLDER
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{FOLDER}/config.json missing under {root}: V4 InP models need the CLIP image encoder folder "
            "for image-to-video; download the full model folder"
        )
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        for weights in sorted(folder.glob("*.safetensors")):  # truncated or corrupt: named, with the fix
            check_safetensors(weights)
        return
    pickles = [name for name in PICKLE_WEIGHTS if (folder / name).is_file()]
    if pickles:
        raise ValueError(
            f"{folder / pickles[0]}: refusing pickle weights, because unpickling can run arbitrary code. Convert "
            'them once in a trusted environment: python -c "from transformers import CLIPVisionModel '
            f"as M; M.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)\""
        )
    raise ValueError(f"{FOLDER}/model.safetensors missing under {root}; download the full model folder")


def _preprocessor_settings(folder: Path, image_size: int) -> dict:
    """Resize / crop sizes and normalisation of the folder's CLIPImageProcessor config (defaults: CLIP's)."""
    path = folder / "preprocessor_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    size = config.get("size", image_size)
    crop = config.get("crop_size", image_size)
    return {
        "shortest_edge": size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size),
        "crop": (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop)),
        "mean": tuple(config.get("image_mean", CLIP_MEAN)),
        "std": tuple(config.get("image_std", CLIP_STD)),
    }


def preprocess(image: torch.Tensor, shortest_edge: int, crop: tuple[int, int], mean, std) -> torch.Tensor:
    """[H, W, 3] (or [B, H, W, 3]) in [0, 1] -> CLIP pixel values [B, 3, crop_h, crop_w]."""
    x = (image[None] if image.ndim == 3 else image).float().permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    scale = shortest_edge / min(h, w)
    size = (shortest_edge, int(w * scale)) if h <= w else (int(h * scale), shortest_edge)
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (x.shape[-2] - crop[0]) // 2, (x.shape[-1] - crop[1]) // 2
    x = x[..., top : top + crop[0], left : left + crop[1]]
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageEncoder:
    """A CLIP vision tower plus its preprocessing; ``encode`` gives the patch features V4 conditions on, or the
    projected image embedding V3 conditions on (``output``)."""

    def __init__(self, model: torch.nn.Module, settings: dict, output: str = "patches"):
        self.model = model
        self.settings = settings
        self.output = output

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def to(self, device) -> ImageEncoder:
        """Move the model to ``device``; returns self (the memory modes call this)."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image [H, W, 3] (or [B, H, W, 3]) in [0, 1] -> [B, patches, hidden] (last hidden state, CLS dropped),
        or [B, projection_dim] for ``output="image_embeds"``."""
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(f"expected an image [H, W, 3] in [0, 1], got shape {tuple(image.shape)}")
        pixels = preprocess(image, **self.settings).to(self.device, self.dtype)
        if self.output == "image_embeds":
            return self.model(pixel_values=pixels).image_embeds
        return self.model(pixel_values=pixels).last_hidden_state[:, 1:]


def load_image_encoder(
    root: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    output: str = "patches",
) -> ImageEncoder:
    """Load ``root/image_encoder`` (CLIP vision, safetensors only); files are checked before weights are read.

    ``output``: "patches" (V4) or "image_embeds" (V3, which needs the folder's visual projection)."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    check_image_encoder_files(root)
    folder = Path(root) / FOLDER
    # A released folder is a whole CLIP: transformers would print every unused text-tower key. Silence that
    # report and check the one thing that matters here, that no vision weight is missing.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model_class = (
            transformers.CLIPVisionModelWithProjection if output == "image_embeds" else transformers.CLIPVisionModel
        )
        model, report = model_class.from_pretrained(
            folder, use_safetensors=True, local_files_only=True, output_loading_info=True, **_dtype_kwargs(dtype)
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(report.get("missing_keys", ()))
    if missing:
        raise ValueError(f"{folder}: the CLIP vision weights lack {len(missing)} tensor(s), e.g. {missing[:3]}")
    settings = _preprocessor_settings(folder, model.config.image_size)
    return ImageEncoder(_frozen(model, device), settings, output)
