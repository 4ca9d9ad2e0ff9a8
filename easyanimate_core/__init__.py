"""EasyAnimate video diffusion models on plain PyTorch (no ComfyUI import anywhere in this package).

Entry points:
    load_transformer(path, dtype=..., device=..., operations=...)  V5 / V5.1 transformer
    load_vae(path, dtype=..., device=..., operations=...)          V4 slice / V5 / V5.1 mag VAE
    inspect_checkpoint(path)                                       what a checkpoint is, from its headers
"""

from .loading import CheckpointInfo, inspect_checkpoint, load_transformer, load_vae
from .transformer import EasyAnimateTransformer3D, TransformerConfig
from .vae import MagvitVAE, VAEConfig

__all__ = [
    "CheckpointInfo",
    "EasyAnimateTransformer3D",
    "MagvitVAE",
    "TransformerConfig",
    "VAEConfig",
    "inspect_checkpoint",
    "load_transformer",
    "load_vae",
]
