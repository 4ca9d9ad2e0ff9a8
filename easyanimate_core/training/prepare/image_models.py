"""The image-model filters of ``easyanimate prepare``: scene-transition similarity and aesthetic score.

    check_model_folder(flag, folder)              config and safetensors weights present (nothing downloaded)
    embedding_size(folder) -> int                 the width of the folder's image embeddings, from its config
    ImageEmbedder(folder, device)                 a local CLIP / SigLIP / DINOv2 folder: frames -> unit embeddings
    consistency_indices(frames, fps, keyframes)   the frames compared: first, 1 s, every I-frame, last
    adjacent_similarity(embeddings) -> [float]    cosine similarity of each sampled frame with the next
    AestheticHead.load(file)                      the linear scoring head of an aesthetic predictor

Official (compute_semantic_consistency.py): CLIP ViT-L/14-336 image features of the keyframes plus the frame at
1 s ("keyframe+first"); a clip is dropped if any two neighbouring samples have a cosine similarity under 0.8 (a cut
the splitter missed). We also compare the last frame. An encoder puts I-frames at content changes (x264's
scenecut), so the keyframes are where a missed transition shows.

Official aesthetics (compute_video_quality.py): aesthetic-predictor v2.5, a SigLIP image model whose normalised
embedding goes through a chain of Linear layers (no activations), on 4 uniformly sampled frames; a clip under a
mean of 4.0 is dropped. Here any transformers image model folder and any such head file work (v2.5's
``aesthetic_predictor_v2_5.pth`` on SigLIP so400m, or LAION's improved-aesthetic-predictor on CLIP ViT-L/14).
Models load with ``local_files_only=True``: nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...loading import check_safetensors


def check_model_folder(flag: str, folder: str | Path) -> Path:
    """ValueError naming ``flag`` unless ``folder`` is a transformers model folder with safetensors weights."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"{flag} {folder}: no such folder; give a local transformers model folder (nothing is downloaded)"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{flag} {folder}: no config.json; give the folder that save_pretrained wrote (the model's own)"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt*"))
        hint = (
            f" (it has {pickles[0].name}: pickle weights are refused because unpickling can run code; convert once "
            "with from_pretrained(...).save_pretrained(..., safe_serialization=True))"
            if pickles
            else ""
        )
        raise ValueError(f"{flag} {folder}: no .safetensors weights{hint}")
    for file in weights:
        try:
            check_safetensors(file)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from e
    return folder


def embedding_size(folder: Path) -> int | None:
    """Width of the image embeddings ``ImageEmbedder`` gives for ``folder`` (from config.json), or None if unknown."""
    config = json.loads((folder / "config.json").read_text())
    if "projection_dim" in config:  # CLIP: get_image_features projects
        return int(config["projection_dim"])
    vision = config.get("vision_config", config)  # SigLIP: pooled vision output; DINOv2: mean hidden state
    return int(vision["hidden_size"]) if "hidden_size" in vision else None


def dtype_for(device: str) -> torch.dtype:
    """float16 on a GPU (as official), float32 on the CPU."""
    return torch.float16 if device.startswith("cuda") else torch.float32


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype argument, whose name changed in transformers 5 (torch_dtype -> dtype)."""
    import transformers

    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


class ImageEmbedder:
    """A local image model: RGB frames -> L2-normalised embeddings [N, D] float32."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.device, self.dtype = device, dtype_for(device)
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, **dtype_kwargs(self.dtype)
        )
        self.model = model.requires_grad_(False).eval().to(device)

    @torch.no_grad()
    def embed(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Unit embeddings [N, D] of N RGB frames [H, W, 3] uint8."""
        pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"]  # [N, 3, h, w]
        pixels = pixels.to(self.device, self.dtype)
        if hasattr(self.model, "get_image_features"):  # CLIP / SigLIP
            features = self.model.get_image_features(pixel_values=pixels)
            # transformers 5 returns an output object whose pooler_output is the (projected) embedding.
            features = features if torch.is_tensor(features) else features.pooler_output
        else:  # DINOv2 and other plain vision models: the official mean of the last hidden state
            features = self.model(pixel_values=pixels).last_hidden_state.mean(dim=1)
        return F.normalize(features.float(), dim=-1).cpu()  # [N, D]


def consistency_indices(frames: int, fps: float, keyframes: list[int]) -> list[int]:
    """Sorted frame indices to compare: the first, the one at 1 s, every I-frame and the last."""
    one_second = int(fps)
    wanted = {0, frames - 1, *(k for k in keyframes if 0 <= k < frames)}
    if one_second < frames:
        wanted.add(one_second)
    return sorted(wanted)


def adjacent_similarity(embeddings: torch.Tensor) -> list[float]:
    """Cosine similarity of each unit embedding [N, D] with the next: N - 1 values."""
    return (embeddings[:-1] * embeddings[1:]).sum(dim=-1).tolist()


class AestheticHead(torch.nn.Module):
    """A chain of Linear layers applied to a unit image embedding (the aesthetic predictors have no activations)."""

    def __init__(self, layers: list[torch.nn.Linear]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    @property
    def in_features(self) -> int:
        """The embedding width the head takes."""
        return self.layers[0].in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores [N] of unit embeddings [N, D]."""
        x = embeddings
        for layer in self.layers:
            x = layer(x)
        return x[:, 0]

    @classmethod
    def load(cls, path: str | Path) -> AestheticHead:
        """The head in a .safetensors or .pth state dict (``<prefix><index>.weight`` / ``.bias``, Linear layers in
        index order); ValueError naming the file if it is not such a chain ending in one output."""
        path = Path(path).expanduser()
        tensors = _read_state_dict(path)
        numbered = {}
        for key, tensor in tensors.items():
            match = re.search(r"(\d+)\.(weight|bias)$", key)
            if match:
                numbered.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        layers = []
        for index in sorted(numbered):
            weight, bias = numbered[index].get("weight"), numbered[index].get("bias")
            if weight is None or weight.dim() != 2:
                continue  # not a Linear layer (the heads' Dropout layers hold nothing)
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            with torch.no_grad():
                layer.weight.copy_(weight.float())
                if bias is not None:
                    layer.bias.copy_(bias.float())
            layers.append(layer)
        chained = all(a.out_features == b.in_features for a, b in zip(layers, layers[1:], strict=False))
        if not layers or not chained or layers[-1].out_features != 1:
            shapes = [tuple(layer.weight.shape) for layer in layers]
            raise ValueError(
                f"{path}: not an aesthetic head (numbered Linear layers chaining to one output); found {shapes}"
            )
        return cls(layers).eval().requires_grad_(False)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pth/.pt file read with ``weights_only`` (no code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many kinds for a damaged or foreign file
        raise ValueError(f"{path}: cannot read the aesthetic head ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state
