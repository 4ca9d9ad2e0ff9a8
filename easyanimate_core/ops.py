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


def cast_param(param: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``param`` on ``like``'s device and dtype (weights may be streamed or stored in another dtype)."""
    if param is None:
        return None
    return param.to(device=like.device, dtype=like.dtype)


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
