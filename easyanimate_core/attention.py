"""The one attention function every model calls.

All attention in easyanimate_core goes through :func:`attention`, so a host (ComfyUI's optimized
attention, a flash-attention kernel, a memory-saving chunked variant) can swap the implementation
in one place with :func:`set_attention_backend`.
"""

from __future__ import annotations

import contextlib
import logging
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


def current_attention_backend() -> AttentionFn:
    """The attention implementation installed now."""
    return _backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full attention over [B, heads, L, head_dim] tensors through the installed backend."""
    return _backend(q, k, v)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention with an additive score ``bias`` broadcastable to [B, heads, Lq, Lk] (a model's key mask given as
    the bias its official code adds). The backends take no bias, so this is PyTorch's SDPA always."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def _sage_attention() -> AttentionFn:
    from sageattention import sageattn  # optional: pip install sageattention (CUDA)

    def run(q, k, v):
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            return sdpa_attention(q, k, v)  # its kernels are CUDA half precision only
        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)

    return run


def _flash_attention() -> AttentionFn:
    from flash_attn import flash_attn_func  # optional: pip install flash-attn (CUDA)

    def run(q, k, v):
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            return sdpa_attention(q, k, v)
        # flash-attn takes [B, L, heads, head_dim]
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return run


BACKENDS: dict[str, Callable[[], AttentionFn]] = {
    "sdpa": lambda: sdpa_attention,
    "sage": _sage_attention,
    "flash": _flash_attention,
}


def attention_backend(name: str) -> tuple[AttentionFn, str]:
    """(function, the name that runs) for a backend name; a backend whose package is missing falls back to sdpa
    with a one-line warning. Sage and flash run on CUDA half-precision tensors; other calls go to sdpa."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        return BACKENDS[name](), name
    except ImportError as e:
        logging.getLogger(__name__).warning("attention: %s is not installed (%s); running sdpa", name, e)
        return sdpa_attention, "sdpa"


@contextlib.contextmanager
def using_attention(fn: AttentionFn):
    """Install ``fn`` as the backend inside the ``with`` block, then restore the previous one."""
    previous = set_attention_backend(fn)
    try:
        yield
    finally:
        set_attention_backend(previous)
