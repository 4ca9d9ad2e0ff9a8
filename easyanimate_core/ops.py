"""The layer namespace every model module is built from, and the numerics shared by all models.

Models take ``operations`` (a namespace with ``Linear``, ``Conv2d``, ``Conv3d``, ``GroupNorm``,
``LayerNorm``, ``RMSNorm``, ``Embedding``), plus ``dtype`` and ``device``, exactly as ComfyUI's
``comfy/ldm`` models do. The default is plain ``torch.nn``; inside ComfyUI the nodes pass
``comfy.ops`` (fp8 storage, manual casting, lowvram weight streaming) with no change to model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

default_operations = nn


def _to_input(param: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """``param`` on ``device`` in ``dtype``; no copy when it already is. Moves first, so fp8 travels at 1 byte."""
    if param is None:
        return None
    # Host-to-device copies may overlap with compute (they are stream-ordered); never the reverse direction.
    param = param.to(device, non_blocking=param.device.type == "cpu")
    return param.to(dtype)


def cast_param(param: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``param`` on ``like``'s device and dtype (weights may be streamed or stored in another dtype)."""
    return _to_input(param, like.device, like.dtype)


def layer_norm_fp32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a LayerNorm module in float32 whatever its weight dtype, and return ``x``'s dtype.

    The released models compute their adaLN norms in fp32; doing the cast here (rather than in
    the module) keeps it correct for every ``operations`` namespace, streamed weights included.
    """
    x32 = x.float()
    y = F.layer_norm(x32, norm.normalized_shape, cast_param(norm.weight, x32), cast_param(norm.bias, x32), norm.eps)
    return y.to(x.dtype)


def rms_norm_fp32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run an RMSNorm module in float32 whatever its weight dtype, and return ``x``'s dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
    if norm.weight is not None:
        y = y * cast_param(norm.weight, x32)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Casting layers (ComfyUI's ``manual_cast``): weights may live on another device or in another dtype
# --------------------------------------------------------------------------------------------------


class CastWeights:
    """Mixin: ``weight`` and ``bias`` cast to the input's device and dtype for one call, then dropped.

    A model built from these layers computes wherever its input is, whatever its weights' device and
    dtype: weights on the CPU with activations on the GPU stream one layer at a time (sequential
    offload), and fp8-stored weights compute in the activations' dtype (qfloat8).
    """

    def cast_weight_bias(self, x: torch.Tensor, dtype: torch.dtype | None = None):
        dtype = dtype or x.dtype
        return _to_input(self.weight, x.device, dtype), _to_input(getattr(self, "bias", None), x.device, dtype)


class CastLinear(CastWeights, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.cast_weight_bias(x))


class CastConv2d(CastWeights, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, *self.cast_weight_bias(x))


class CastConv3d(CastWeights, nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, *self.cast_weight_bias(x))


class CastGroupNorm(CastWeights, nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.cast_weight_bias(x)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


class CastLayerNorm(CastWeights, nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.cast_weight_bias(x)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class CastRMSNorm(CastWeights, nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, _ = self.cast_weight_bias(x)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class CastEmbedding(CastWeights, nn.Embedding):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Indices carry no compute dtype: keep the stored one (fp8-stored embeddings are not supported).
        weight, _ = self.cast_weight_bias(x, dtype=self.weight.dtype)
        return F.embedding(
            x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


class manual_cast:  # noqa: N801 - a namespace named like ComfyUI's, used as ``operations=manual_cast``
    """The ``operations`` namespace of casting layers (same constructors and state-dict keys as ``torch.nn``)."""

    Linear = CastLinear
    Conv2d = CastConv2d
    Conv3d = CastConv3d
    GroupNorm = CastGroupNorm
    LayerNorm = CastLayerNorm
    RMSNorm = CastRMSNorm
    Embedding = CastEmbedding
