"""Tiny VAE configurations and helpers shared by the VAE tests (fast on two CPU cores)."""

from __future__ import annotations

from dataclasses import replace

import torch

from easyanimate_core.vae import VAE_V4, VAE_V5, VAE_V51, MagvitVAE, VAEConfig

# Channel-changing blocks on purpose (8 -> 16 -> 32): diffusers' own tests only use equal widths.
TINY = dict(block_out_channels=(8, 16, 32, 32), latent_channels=4, norm_num_groups=4, layers_per_block=1)
# Mid-block attention needs layers_per_block >= 2 (one attention between consecutive resnets).
TINY_ATTN = dict(TINY, layers_per_block=2)

TINY_V51 = replace(VAE_V51, **TINY)
TINY_V5 = replace(VAE_V5, **TINY_ATTN)
TINY_V4 = replace(VAE_V4, **TINY_ATTN)


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter (GroupNorm weights start at exactly 1/0 otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module.eval()


def tiny_vae(config: VAEConfig, seed: int = 0) -> MagvitVAE:
    """A tiny MagvitVAE with reproducible random weights."""
    torch.manual_seed(seed)
    return perturb_(MagvitVAE(config), seed)


def video(frames: int, size: int = 16, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """Random video [B,3,F,size,size] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1


def latents(frames: int, size: int = 2, channels: int = 4, batch: int = 1, seed: int = 2) -> torch.Tensor:
    """Random latents [B,L,T,size,size] (already divided by the scaling factor)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, frames, size, size, generator=g)


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|."""
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    return ((ours - ref).abs().max() / ref.abs().max()).item()
