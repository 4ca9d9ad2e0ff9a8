"""LoRA files for the EasyAnimate transformer: every common layout read onto our module paths.

    read_lora(path_or_state_dict, model) -> {module path: LoraLayer}
    merge_lora(model, lora, strength)   /  unmerge_lora(model, lora, strength)
    UnmergedLora(model, lora, strength)    forward hooks instead of merged weights; .remove()
    save_lora(path, lora, layout="official", metadata=None, dtype=None)   write a LoRA (atomically)
    lora_state_dict(lora, layout)          the tensors of a LoRA in one of LAYOUTS
    LoraNetwork(model, rank, alpha, targets)  trainable LoRA layers on a model's Linear layers (forward hooks)

Layouts (spec §6.2):
* official (kohya ``LoRANetwork``): ``lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight``
  [rank, in], ``.lora_up.weight`` [out, rank], ``.alpha`` (scalar); the module path with '.' -> '_'. V1-V3 LoRAs
  (official utils/lora_utils.py at f9eeabe) use the same rule on the same module paths (every Linear, the motion
  modules included: the trainer sets add_lora_in_attn_temporal), and a trainer run with --train_text_encoder adds
  the T5's layers as ``lora_te_encoder_block_0_layer_0_SelfAttention_q...``: read those with ``prefix="lora_te"``
  onto the T5EncoderModel.
* peft: ``[base_model.model.]transformer_blocks.0.attn1.to_q.lora_A.weight`` (down) / ``lora_B`` (up).
* diffusers: the peft names under a ``transformer.`` prefix, with diffusers' module names
  (``attn1.add_q_proj`` ...), converted to the official ones.
A layer's update is ``strength * alpha / rank * up @ down`` (alpha = rank when a file has none, i.e.
scale 1, as the official loader does). Written peft and diffusers files carry no alpha (those layouts keep
it in an adapter config): the writer folds alpha / rank into ``lora_B``, so every layout patches alike.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import nn

from .atomic import atomic_path
from .keys import diffusers_to_official, official_to_diffusers, strip_key_prefix
from .loading import check_safetensors

logger = logging.getLogger(__name__)

# Official name prefixes: the transformer's layers, and the text encoder's when the trainer trained it too.
KOHYA_PREFIXES = ("lora_unet", "lora_te")
_KOHYA = {p: re.compile(rf"^{p}_+(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$") for p in KOHYA_PREFIXES}
_PEFT = re.compile(r"^(.+?)\.(lora_A|lora_B)(?:\.default)?\.weight$")
_PEFT_ALPHA = re.compile(r"^(.+?)\.alpha$")
LAYOUTS = ("official", "peft", "diffusers")


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


def _group(
    state_dict: dict[str, torch.Tensor], underscored: dict[str, str], prefix: str
) -> tuple[dict[str, dict], list[str], list[str]]:
    """{module path: {"down", "up", "alpha"}}, the keys that belong to no LoRA layer layout, and the official
    keys of another part (another ``KOHYA_PREFIXES`` prefix)."""
    groups: dict[str, dict] = {}
    stray, other_part = [], []
    for key, tensor in state_dict.items():
        if key.startswith(tuple(f"{p}_" for p in KOHYA_PREFIXES if p != prefix)):
            other_part.append(key)
            continue
        if m := _KOHYA[prefix].match(key):
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
    return groups, stray, other_part


def read_lora(
    source: str | Path | dict[str, torch.Tensor],
    model: nn.Module,
    name: str | None = None,
    prefix: str = "lora_unet",
) -> dict[str, LoraLayer]:
    """Read a LoRA (file or state dict) onto ``model``'s Linear layers; ValueError when nothing fits.

    ``prefix`` picks the official entries to read: "lora_unet" (the transformer) or "lora_te" (the text encoder,
    e.g. V1-V3's T5EncoderModel). A partial match logs a warning with the count and examples of the keys that
    matched no layer; the other prefix's entries get their own warning. Messages start with ``name`` (default:
    the file, or "the LoRA state dict").
    """
    if prefix not in KOHYA_PREFIXES:
        raise ValueError(f"unknown LoRA prefix {prefix!r}; valid: {', '.join(KOHYA_PREFIXES)}")
    name = name or (str(source) if not isinstance(source, dict) else "the LoRA state dict")
    if isinstance(source, (str, Path)):
        if Path(source).suffix != ".safetensors":
            raise ValueError(f"{source}: LoRAs are read from .safetensors files only (pickle files can run code)")
        check_safetensors(source)  # truncated or corrupt: named, with the fix (not the library's raw error)
        state_dict = load_file(str(source))
    else:
        state_dict = source
    targets = _linear_paths(model)
    underscored = {path.replace(".", "_"): path for path in targets}
    groups, stray, other_part = _group(state_dict, underscored, prefix)
    if not groups and other_part:
        raise ValueError(
            f"{name}: no {prefix}_* entries; its {len(other_part)} official entries are for another part "
            f"(e.g. {sorted(other_part)[:2]}): read it onto the model that part names"
        )
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
    if other_part:
        logger.warning(
            "%s: %d entries are for another part of the model (e.g. %s) and are not applied here; read them "
            "with read_lora(..., prefix=%r) onto that part",
            name,
            len(other_part),
            sorted(other_part)[:2],
            next(p for p in KOHYA_PREFIXES if other_part[0].startswith(f"{p}_")),
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


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def kohya_name(path: str) -> str:
    """The official (kohya ``LoRANetwork``) name of a transformer module path: root name '' gives '__'."""
    return "lora_unet__" + path.replace(".", "_")


def lora_state_dict(
    lora: dict[str, LoraLayer], layout: str = "official", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of ``lora`` named for ``layout`` (see the module docstring), cast to ``dtype`` if given."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    out = {}
    for path, layer in lora.items():
        down, up = layer.down.detach().float().cpu(), layer.up.detach().float().cpu()
        alpha = float(layer.alpha if layer.alpha is not None else layer.rank)
        if layout == "official":
            name = kohya_name(path)
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(alpha)
            continue
        name = (
            f"base_model.model.{path}"
            if layout == "peft"
            else "transformer." + official_to_diffusers(path + ".weight")[: -len(".weight")]
        )
        out[f"{name}.lora_A.weight"] = down
        out[f"{name}.lora_B.weight"] = up * (alpha / layer.rank)
    return {k: v.to(dtype or v.dtype).contiguous() for k, v in out.items()}


def _addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """The sd-webui-additional-networks hashes the official trainer stores (over the ``ss_`` metadata only)."""
    data = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_end = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[header_end:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def save_lora(
    path: str | Path,
    lora: dict[str, LoraLayer],
    *,
    layout: str = "official",
    metadata: dict[str, object] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``lora`` as a .safetensors file in ``layout``, atomically; metadata values are stored as strings."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRAs are written as .safetensors files")
    tensors = lora_state_dict(lora, layout, dtype)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if layout == "official":
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = _addnet_hashes(tensors, meta)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), meta)
    return path


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def lora_targets(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Paths of the ``nn.Linear`` layers to train: all of them by default (as the official trainer), or
    those matching any of the fnmatch ``patterns`` (e.g. ``*attn*``, ``transformer_blocks.0.*``)."""
    paths = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if patterns:
        paths = [p for p in paths if any(fnmatch.fnmatchcase(p, pattern) for pattern in patterns)]
        if not paths:
            raise ValueError(
                f"--lora-targets {' '.join(patterns)} match no Linear layer of this model "
                f"(paths look like {[name for name, m in model.named_modules() if isinstance(m, nn.Linear)][:4]})"
            )
    return paths


class LoraModule(nn.Module):
    """One trainable low-rank update: ``alpha / rank * up(down(x))``; down kaiming-uniform, up zero (official)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, generator=None):
        super().__init__()
        self.lora_down = nn.Linear(in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, out_features, bias=False)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / rank
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As the official LoRAModule: computed in the LoRA's own (float32) dtype, added in the layer's dtype.
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * self.scale

    def layer(self) -> LoraLayer:
        """A detached float32 CPU copy as a LoraLayer (for saving and merging)."""
        return LoraLayer(
            self.lora_down.weight.detach().float().cpu().clone(),
            self.lora_up.weight.detach().float().cpu().clone(),
            float(self.alpha),
        )


class LoraNetwork(nn.Module):
    """Trainable LoRA layers for ``model``'s Linear layers, named as the official file's keys.

    ``state_dict()`` is exactly the official file's tensors (``lora_unet__<path>.lora_down.weight`` ...).
    ``attach(model)`` adds each update to its layer's output through a forward hook (the model's weights
    are not touched, so the base model stays frozen and shareable); ``detach()`` removes the hooks.
    ``generator`` seeds the initialisation, so every process of a distributed run starts alike.
    """

    def __init__(
        self,
        model: nn.Module,
        rank: int,
        alpha: float | None = None,
        targets: list[str] | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.paths: dict[str, str] = {}  # module path -> kohya name
        for path in lora_targets(model, targets):
            linear = model.get_submodule(path)
            name = kohya_name(path)
            self.add_module(name, LoraModule(linear.in_features, linear.out_features, rank, self.alpha, generator))
            self.paths[path] = name
        self._handles = []

    def attach(self, model: nn.Module) -> LoraNetwork:
        """Hook every LoRA layer onto its module of ``model``; returns self."""
        self.detach()
        for path, name in self.paths.items():
            lora = getattr(self, name)
            self._handles.append(
                model.get_submodule(path).register_forward_hook(
                    lambda module, inputs, output, lora=lora: output + lora(inputs[0]).to(output.dtype)
                )
            )
        return self

    def detach(self) -> None:
        """Remove the hooks (the LoRA weights stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def layers(self) -> dict[str, LoraLayer]:
        """{module path: LoraLayer} copies of the current weights, for save_lora / merge_lora."""
        return {path: getattr(self, name).layer() for path, name in self.paths.items()}
