"""Memory modes for running outside ComfyUI, named as in the official EasyAnimate tools (GPU_memory_mode).

    placement = ModelPlacement("model_cpu_offload", device="cuda", dtype=torch.bfloat16)
    transformer = load_transformer(root, dtype=..., device=placement.load_device, operations=placement.operations)
    transformer = placement.prepare_transformer(transformer)
    with placement.using("transformer", transformer):
        ...  # the transformer is on the compute device here (unless its weights stream)
    placement.log  # [(stage, names of the models resident on the compute device), ...]

Modes:
* ``full``: every model on the compute device all the time.
* ``model_cpu_offload``: every model lives on the CPU and is on the compute device only inside ``using``,
  so the text encoder, transformer and VAE are never resident together.
* ``model_cpu_offload_and_qfloat8``: as above; the transformer blocks' Linear weights are stored as
  float8_e4m3fn and upcast to the compute dtype in each layer's forward (``ops.manual_cast``).
* ``sequential_cpu_offload``: models built with ``ops.manual_cast`` keep every weight on the CPU; each
  layer copies its weights to the activations' device for its own forward only. Models built elsewhere
  (the Hugging Face text encoders) fall back to model offload.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .ops import CastWeights, default_operations, manual_cast

MEMORY_MODES = ("full", "model_cpu_offload", "model_cpu_offload_and_qfloat8", "sequential_cpu_offload")
FP8 = torch.float8_e4m3fn
_CASTING_MODES = ("model_cpu_offload_and_qfloat8", "sequential_cpu_offload")


def _on(tensor_device: torch.device, device: torch.device) -> bool:
    """Whether a tensor on ``tensor_device`` is on ``device`` (``cuda`` matches any ``cuda:N``)."""
    return tensor_device.type == device.type and (device.index is None or tensor_device.index == device.index)


def bytes_on(device, *modules: nn.Module) -> int:
    """Parameter and buffer bytes of ``modules`` actually located on ``device`` (shared tensors once)."""
    device = torch.device(device)
    seen: set[int] = set()
    total = 0
    for module in modules:
        for t in itertools.chain(module.parameters(), module.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if _on(t.device, device):
                total += t.numel() * t.element_size()
    return total


def store_linear_weights_fp8(blocks: nn.Module) -> int:
    """Store every Linear weight under ``blocks`` as float8_e4m3fn, one layer at a time; returns how many.

    The layers must cast weights on the fly (``ops.manual_cast``), as the official qfloat8 wrapper does.
    Replacing one weight at a time frees each high-precision copy at once, so peak RAM grows by one layer.
    """
    converted = 0
    for module in blocks.modules():
        if not isinstance(module, nn.Linear) or module.weight.dtype == FP8:
            continue
        if not isinstance(module, CastWeights):
            raise TypeError(f"{type(module).__name__} cannot compute with fp8 weights; build with ops.manual_cast")
        # A plain cast, no scale, as the official convert_weight_dtype_wrapper.
        module.weight = nn.Parameter(module.weight.detach().to(FP8), requires_grad=False)
        converted += 1
    return converted


def _streams_weights(model) -> bool:
    """Whether ``model`` is built from casting layers, which fetch their weights to the input's device."""
    return isinstance(model, nn.Module) and any(isinstance(m, CastWeights) for m in model.modules())


class ModelPlacement:
    """Where each model's weights live for one memory mode, and a log of what was on the device per stage.

    Models are anything with ``.to(device)`` (``nn.Module``, ``TextEncoders``). The manager keeps only weak
    references, so deleting a model (the text encoders after encoding) frees it. ``offload_device`` is
    where offloaded weights wait (the CPU).
    """

    def __init__(self, mode: str, device, dtype: torch.dtype, offload_device="cpu"):
        if mode not in MEMORY_MODES:
            raise ValueError(f"unknown memory mode {mode!r}; choose one of {', '.join(MEMORY_MODES)}")
        self.mode = mode
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload_device = torch.device(offload_device)
        self.log: list[tuple[str, tuple[str, ...]]] = []
        self._models: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()
        self._resident: set[str] = set()

    @property
    def operations(self):
        """The layer namespace to build the transformer and VAE with in this mode."""
        return manual_cast if self.mode in _CASTING_MODES else default_operations

    @property
    def load_device(self) -> torch.device:
        """Where loaders should put weights: the compute device in ``full``, else the offload device."""
        return self.device if self.mode == "full" else self.offload_device

    def prepare_transformer(self, model: nn.Module) -> nn.Module:
        """The transformer ready for this mode: fp8 block Linear weights in qfloat8 mode; returns it."""
        if self.mode == "model_cpu_offload_and_qfloat8":
            # V5 / V5.1 name their blocks transformer_blocks, V4 blocks.
            store_linear_weights_fp8(model.transformer_blocks if hasattr(model, "transformer_blocks") else model.blocks)
        return model

    def resident(self) -> tuple[str, ...]:
        """Names of the live models this manager has put on the compute device, sorted."""
        return tuple(sorted(name for name in self._resident if name in self._models))

    def add(self, name: str, model):
        """Register ``model`` under ``name`` and place it for the mode (device in ``full``); returns it."""
        self._models[name] = model
        if self.mode == "full":
            self._move(name, model, on_device=True)
        return model

    @contextmanager
    def using(self, name: str, model) -> Iterator:
        """Run a stage with ``model``: on the compute device inside the block, back to the CPU after.

        ``full`` moves nothing; casting (sequential) models stay on the CPU and stream their weights.
        Each entry appends (``name``, models resident on the device) to ``log``.
        """
        if self._models.get(name) is not model:
            self.add(name, model)
        moves = self.mode != "full" and not (self.mode == "sequential_cpu_offload" and _streams_weights(model))
        if moves:
            self._move(name, model, on_device=True)
        self.log.append((name, self.resident()))
        try:
            yield model
        finally:
            if moves:
                self._move(name, model, on_device=False)

    def _move(self, name: str, model, on_device: bool) -> None:
        """Move ``model`` to the compute device or the offload device, and remember which.

        The record is kept here, not measured, because the two devices may be the same (a CPU run).
        """
        model.to(self.device if on_device else self.offload_device)
        (self._resident.add if on_device else self._resident.discard)(name)

    def describe(self) -> str:
        """The residency log in words, one stage a line (for ``--verbose``)."""
        lines = [f"memory mode {self.mode}, compute device {self.device}:"]
        for stage, names in self.log:
            lines.append(f"  {stage}: on {self.device}: {', '.join(names) or 'no whole model (weights streamed)'}")
        return "\n".join(lines)
