"""The one attention function every model calls.

All attention in easyanimate_core goes through :func:`attention`, so a host (ComfyUI's optimized
attention, a flash-attention kernel, a memory-saving chunked variant) can swap the implementation
in one place with :func:`set_attention_backend`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (q, k, v) each [B, heads, L, head_dim] -> [B, heads, L, head_dim]; full (non-causal), no mask,
# scaled by 1/sqrt(head_dim).
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention (the default backend)."""
    return F.scaled_dot_product_attention(q, k, v)


_backend: AttentionFn = sdpa_attention


def set_attention_backend(fn: AttentionFn | None) -> AttentionFn:
    """Install ``fn`` as the attention implementation (``None`` restores SDPA); return the old one."""
    global _backend
    previous = _backend
    _backend = fn or sdpa_attention
    return previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full attention over [B, heads, L, head_dim] tensors through the installed backend."""
    return _backend(q, k, v)
