"""EasyAnimate video diffusion models on plain PyTorch (no ComfyUI import anywhere in this package).

Entry points:
    load_transformer(path, dtype=..., device=..., operations=...)  V4 / V5 / V5.1 transformer
    load_vae(path, dtype=..., device=..., operations=...)          V4 slice / V5 / V5.1 mag VAE
    load_text_encoders(root, version)                              Qwen2-VL (V5.1), BERT + mT5 (V4 / V5) or T5 (V1-V3)
    load_image_encoder(root)                                       CLIP vision of V4 InP (image_encoder/)
    make_sampler(name, version, steps, strength=...)               the released samplers of each version
    generate(transformer, vae, prompts, sampler, ...)              text / image / video / control to video
    inspect_checkpoint(path)                                       what a checkpoint is, from its headers
"""

from .image_encoder import ImageEncoder, load_image_encoder
from .loading import CheckpointInfo, inspect_checkpoint, load_transformer, load_vae
from .pipeline import generate
from .sampling import DEFAULTS, SAMPLERS, make_sampler
from .text_encoders import PromptEmbeds, PromptPair, TextEncoders, load_text_encoders
from .transformer import EasyAnimateTransformer3D, TransformerConfig
from .transformer_v4 import EasyAnimateV4Transformer3D, TransformerV4Config
from .vae import VAE_V4, VAE_V5, VAE_V51, MagvitVAE, VAEConfig

__all__ = [
    "DEFAULTS",
    "SAMPLERS",
    "VAE_V4",
    "VAE_V5",
    "VAE_V51",
    "CheckpointInfo",
    "EasyAnimateTransformer3D",
    "EasyAnimateV4Transformer3D",
    "ImageEncoder",
    "MagvitVAE",
    "PromptEmbeds",
    "PromptPair",
    "TextEncoders",
    "TransformerConfig",
    "TransformerV4Config",
    "VAEConfig",
    "generate",
    "inspect_checkpoint",
    "load_image_encoder",
    "load_text_encoders",
    "load_transformer",
    "load_vae",
    "make_sampler",
]
