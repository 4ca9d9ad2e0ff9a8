"""The layer namespace of a GGUF model: Linear layers that keep their weight in its block format and dequantize
it to the input's dtype and device each time they run (the rest of the namespace is the base one's).

    ops = gguf_operations(base)      base: torch.nn, our ops, or comfy.ops (lowvram streaming moves the bytes)

A quantized layer carries ``quant_kind`` and ``quant_shape``; its ``weight`` parameter is the uint8 bytes.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .blocks import dequantize


def gguf_operations(base) -> types.SimpleNamespace:
    """``base`` with a Linear that reads quantized weights (a new namespace; ``base`` is unchanged)."""
    base_linear = base.Linear

    class Linear(base_linear):
        quant_kind: str | None = None
        quant_shape: tuple[int, ...] | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.quant_kind is None:
                return super().forward(x)
            weight = dequantize(self.weight.to(x.device), self.quant_kind, self.quant_shape, x.dtype)
            bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
            return F.linear(x, weight, bias)

    names = [n for n in dir(base) if not n.startswith("_")]
    namespace = types.SimpleNamespace(**{n: getattr(base, n) for n in names})
    namespace.Linear = Linear
    return namespace
