"""Latent-to-RGB preview colours of a VAE: a linear map from one latent pixel to the colour it decodes to.

Samplers show live previews by multiplying each latent pixel's channels with a ``[latent_channels, 3]``
matrix and adding a bias, instead of running the VAE. The matrix depends on the VAE's weights, so it is
fitted here from the VAE itself: random latents that vary smoothly in space (as real latents mostly
do) are decoded to one frame, the frame is averaged over each latent pixel's 8x8 block, and least
squares finds the factors and bias that best map the latent pixels to those colours (RGB in [-1, 1]).

``fit_latent_rgb`` works on a loaded VAE (a few small decodes); ``latent_rgb_for_checkpoint`` loads
the VAE at a path when no cached fit exists and keeps results in memory and, optionally, as JSON files
in a cache folder, keyed by the VAE files' paths, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .vae import MagvitVAE

# The fit's size: SAMPLES latents of SIZE x SIZE latent pixels, one latent frame each (4 x 64 equations
# per colour for 17 unknowns), smooth at GRID x GRID control points. At the released size this is
# four 64x64-pixel frame decodes.
SAMPLES = 4
SIZE = 8
GRID = 3
CACHE_VERSION = 1  # bump when the fit changes, so older cache files are ignored


@dataclass(frozen=True)
class LatentRGB:
    """``rgb = latent @ factors + bias`` for one latent pixel in VAE space (rgb in [-1, 1])."""

    factors: list[list[float]]  # [latent_channels][3]
    bias: list[float]  # [3]
    rms_error: float  # root-mean-square colour error of the fit on its own samples
    colour_rms: float  # root-mean-square of the fitted colours about their mean (for scale)

    def scaled(self, scale_factor: float) -> LatentRGB:
        """The same map for latents multiplied by ``scale_factor`` (a sampler's model space)."""
        factors = [[v / scale_factor for v in row] for row in self.factors]
        return LatentRGB(factors, list(self.bias), self.rms_error, self.colour_rms)


def smooth_latents(
    n: int, channels: int, size: int, std: float, generator: torch.Generator, grid: int = GRID
) -> torch.Tensor:
    """[n, channels, 1, size, size] normal latents of standard deviation ``std``, bilinear between grid points."""
    coarse = torch.randn(n, channels, grid, grid, generator=generator) * std
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True).unsqueeze(2)


@torch.no_grad()
def pooled_colours(vae: MagvitVAE, latents: torch.Tensor) -> torch.Tensor:
    """Decode single-frame ``latents`` [n, C, 1, h, w] and average each latent pixel's block: [n, 3, h, w]."""
    frame = vae.decode(latents)[:, :, 0].float()  # [n, 3, 8h, 8w]
    return F.avg_pool2d(frame, vae.config.spatial_compression)


@torch.no_grad()
def fit_latent_rgb(vae: MagvitVAE, *, samples: int = SAMPLES, size: int = SIZE, seed: int = 0) -> LatentRGB:
    """Least-squares latent-to-RGB factors and bias of ``vae`` (VAE-space latents, colours in [-1, 1])."""
    cfg = vae.config
    device = next(vae.parameters()).device
    g = torch.Generator().manual_seed(seed)
    # Latents in VAE space have a standard deviation of about 1 / scaling_factor (the DiT sees unit variance).
    z = smooth_latents(samples, cfg.latent_channels, size, 1.0 / cfg.scaling_factor, g)
    rgb = pooled_colours(vae, z.to(device)).cpu()
    x = z[:, :, 0].permute(0, 2, 3, 1).reshape(-1, cfg.latent_channels).double()  # [N, C]
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3).double()  # [N, 3]
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # [C + 1, 3]
    residual = design @ solution - y
    return LatentRGB(
        factors=solution[:-1].tolist(),
        bias=solution[-1].tolist(),
        rms_error=float(residual.pow(2).mean().sqrt()),
        colour_rms=float((y - y.mean(0)).pow(2).mean().sqrt()),
    )


_MEMORY: dict[str, LatentRGB] = {}


def cache_key(files: list[Path]) -> str:
    """Identity of a VAE's weight files: resolved paths, sizes and modification times."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for f in sorted(Path(f).resolve() for f in files):
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:32]


def cached_latent_rgb(key: str, cache_dir: str | Path | None) -> LatentRGB | None:
    """A fit stored under ``key`` in memory or in ``cache_dir``; None when there is none (or it is unreadable)."""
    if key in _MEMORY:
        return _MEMORY[key]
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"{key}.json"
    try:
        fit = LatentRGB(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not all(math.isfinite(v) for row in fit.factors for v in row):
        return None
    _MEMORY[key] = fit
    return fit


def remember_latent_rgb(key: str, fit: LatentRGB, cache_dir: str | Path | None) -> None:
    """Keep ``fit`` under ``key`` in memory and, with ``cache_dir``, in a JSON file written atomically."""
    _MEMORY[key] = fit
    if cache_dir is not None:
        with atomic_path(Path(cache_dir) / f"{key}.json") as tmp:
            tmp.write_text(json.dumps(asdict(fit)))


def latent_rgb_for_checkpoint(path, cache_dir: str | Path | None = None) -> LatentRGB:
    """The preview fit of the VAE at ``path`` (anything ``load_vae`` takes), loading it only when not cached."""
    from .loading import inspect_checkpoint, load_vae

    key = cache_key(inspect_checkpoint(path, "vae").files)
    fit = cached_latent_rgb(key, cache_dir)
    if fit is None:
        fit = fit_latent_rgb(load_vae(path, dtype=torch.float32).eval())
        remember_latent_rgb(key, fit, cache_dir)
    return fit
