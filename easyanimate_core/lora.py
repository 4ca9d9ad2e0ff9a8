"""LoRA files for the EasyAnimate transformer: every common layout read onto our module paths.

    read_lora(path_or_state_dict, model) -> {module path: LoraLayer}
    merge_lora(model, lora, strength)   /  unmerge_lora(model, lora, strength)
    UnmergedLora(model, lora, strength)    forward hooks instead of merged weights; .remove()

Layouts (spec §6.2):
* official (kohya ``LoRANetwork``): ``lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight``
  [rank, in], ``.lora_up.weight`` [out, rank], ``.alpha`` (scalar); the module path with '.' -> '_'.
* peft: ``[base_model.model.]transformer_blocks.0.attn1.to_q.lora_A.weight`` (down) / ``lora_B`` (up).
* diffusers: the peft names under a ``transformer.`` prefix, with diffusers' module names
  (``attn1.add_q_proj`` ...), converted to the official ones.
A layer's update is ``strength * alpha / rank * up @ down`` (alpha = rank when a file has none, i.e.
scale 1, as the official loader does).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .keys import diffusers_to_official, strip_key_prefix

logger = logging.getLogger(__name__)

_KOHYA = re.compile(r"^lora_unet_+(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(.+?)\.(lora_A|lora_B)(?:\.default)?\.weight$")
_PEFT_ALPHA = re.compile(r"^(.+?)\.alpha$")


@dataclass
class LoraLayer:
    """The low-rank update of one Linear layer."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """strength * alpha/rank * up @ down, [out, in], computed in float32 then cast to ``dtype``."""
        scale = strength * (self.alpha if self.alpha is not None else self.rank) / self.rank
        return (scale * (self.up.float() @ self.down.float())).to(dtype)


def _linear_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that owns a 2-D ``weight`` (Linear-like), by its path."""
    return {
        name: m
        for name, m in model.named_modules()
        if name and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2
    }


def _group(state_dict: dict[str, torch.Tensor], underscored: dict[str, str]) -> tuple[dict[str, dict], list[str]]:
    """{module path: {"down", "up", "alpha"}} and the keys that belong to no LoRA layer layout."""
    groups: dict[str, dict] = {}
    stray = []
    for key, tensor in state_dict.items():
        if m := _KOHYA.match(key):
            name, part = m.groups()
            path = underscored.get(name, "?" + name)
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[part]
        elif m := _PEFT.match(strip_key_prefix(key)):
            path, part = diffusers_to_official(m.group(1) + ".weight")[: -len(".weight")], m.group(2)
            part = "down" if part == "lora_A" else "up"
        elif m := _PEFT_ALPHA.match(strip_key_prefix(key)):
            path, part = diffusers_to_official(m.group(1) + ".weight")[: -len(".weight")], "alpha"
        else:
            stray.append(key)
            continue
        groups.setdefault(path, {})[part] = tensor
    return groups, stray


def read_lora(source: str | Path | dict[str, torch.Tensor], model: nn.Module) -> dict[str, LoraLayer]:
    """Read a LoRA (file or state dict) onto ``model``'s Linear layers; ValueError when nothing fits.

    A partial match logs a warning with the count and examples of the keys that matched no layer.
    """
    name = str(source) if not isinstance(source, dict) else "the LoRA state dict"
    if isinstance(source, (str, Path)):
        if Path(source).suffix != ".safetensors":
            raise ValueError(f"{source}: LoRAs are read from .safetensors files only (pickle files can run code)")
        state_dict = load_file(str(source))
    else:
        state_dict = source
    targets = _linear_paths(model)
    underscored = {path.replace(".", "_"): path for path in targets}
    groups, stray = _group(state_dict, underscored)
    if not groups:
        params = set(dict(model.named_parameters()))
        full = sum(strip_key_prefix(diffusers_to_official(k)) in params for k in state_dict)
        if full:
            raise ValueError(
                f"{name}: this is a full model checkpoint ({full} of its tensors are model weights), not a LoRA; "
                "load it with the model loader instead of the LoRA loader"
            )
        raise ValueError(f"{name}: no LoRA tensors found (keys like {sorted(state_dict)[:3]})")

    layers, unmatched = {}, list(stray)
    for path, parts in groups.items():
        if path not in targets or "down" not in parts or "up" not in parts:
            unmatched.append(path.lstrip("?"))
            continue
        layer = LoraLayer(parts["down"], parts["up"], float(parts["alpha"]) if "alpha" in parts else None)
        weight_shape = tuple(targets[path].weight.shape)
        if (layer.up.shape[0], layer.down.shape[1]) != weight_shape or layer.up.shape[1] != layer.rank:
            raise ValueError(
                f"{name}: LoRA for {path} has up {list(layer.up.shape)} and down {list(layer.down.shape)}, "
                f"which do not make the layer's weight {list(weight_shape)}: a LoRA for another model?"
            )
        layers[path] = layer
    if not layers:
        raise ValueError(
            f"{name}: none of its {len(groups)} LoRA layers match a layer of this model "
            f"(e.g. {sorted(unmatched)[:3]}): a LoRA for another model family?"
        )
    if unmatched:
        logger.warning(
            "%s: %d LoRA entries match no layer of this model and are ignored, e.g. %s",
            name,
            len(unmatched),
            sorted(unmatched)[:3],
        )
    return layers


@torch.no_grad()
def merge_lora(model: nn.Module, lora: dict[str, LoraLayer], strength: float = 1.0) -> None:
    """Add ``strength`` x each layer's update to the model's weights in place."""
    for path, layer in lora.items():
        weight = model.get_submodule(path).weight
        weight += layer.delta(strength, torch.float32).to(weight.device, weight.dtype)


def unmerge_lora(model: nn.Module, lora: dict[str, LoraLayer], strength: float = 1.0) -> None:
    """Undo :func:`merge_lora` with the same strength."""
    merge_lora(model, lora, -strength)


class UnmergedLora:
    """A LoRA applied through forward hooks, leaving the weights untouched; ``remove()`` takes it off.

    Each hooked layer adds ``strength * alpha/rank * up(down(x))`` to its output: the weights stay
    shareable (and fp8-storable) at the cost of two thin matmuls per layer.
    """

    def __init__(self, model: nn.Module, lora: dict[str, LoraLayer], strength: float = 1.0):
        self.handles = []
        for path, layer in lora.items():
            scale = strength * (layer.alpha if layer.alpha is not None else layer.rank) / layer.rank
            self.handles.append(model.get_submodule(path).register_forward_hook(self._hook(layer, scale)))

    @staticmethod
    def _hook(layer: LoraLayer, scale: float):
        def add_update(module, inputs, output):
            x = inputs[0]
            down, up = layer.down.to(x.device, x.dtype), layer.up.to(x.device, x.dtype)
            return output + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)

        return add_update

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
