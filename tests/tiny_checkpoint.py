"""Tiny random V5 / V5.1 checkpoints written to disk in the official layout (transformer/, vae/, text encoders)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from easyanimate_core.transformer import VARIANT_IN_CHANNELS, EasyAnimateTransformer3D, TransformerConfig
from easyanimate_core.vae import MagvitVAE, VAEConfig
from tests.tiny_text_models import write_tiny_v5_text_encoders, write_tiny_v51_text_encoder

TEXT_HIDDEN = 32  # hidden size of the tiny Qwen2-VL in tiny_text_models
VAE_CONFIG = {
    "latent_channels": 16,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "spatial_group_norm": True,
    "scaling_factor": 0.7125,
    "mid_block_use_attention": False,
    "cache_mag_vae": True,
    "mini_batch_encoder": 4,
    "mini_batch_decoder": 1,
}


def write_tiny_checkpoint(root: str | Path, variant: str = "InP", seed: int = 0, version: str = "V5.1") -> Path:
    """Write transformer/ (official keys), vae/ and the tiny text encoder(s) under ``root``; return ``root``."""
    root = Path(root)
    torch.manual_seed(seed)
    text = {"text_embed_dim": TEXT_HIDDEN, "add_norm_text_encoder": True}
    if version == "V5":  # BERT + mT5 streams, no RMSNorm before the projections
        text = {"text_embed_dim": TEXT_HIDDEN, "text_embed_dim_t5": TEXT_HIDDEN, "add_norm_text_encoder": False}
    config = TransformerConfig(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=VARIANT_IN_CHANNELS[version][variant],
        out_channels=16,
        num_layers=2,
        mmdit_layers=1,
        time_embed_dim=8,
        **text,
    )
    transformer = EasyAnimateTransformer3D(config)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _save(root / "transformer", transformer.state_dict(), {**vars(config), "compat": None})
    vae_config = (
        VAE_CONFIG
        if version == "V5.1"
        else {**VAE_CONFIG, "mid_block_use_attention": True, "mid_block_attention_type": "spatial"}
    )
    vae = MagvitVAE(VAEConfig.from_dict(vae_config))
    _save(root / "vae", vae.state_dict(), vae_config)
    (write_tiny_v51_text_encoder if version == "V5.1" else write_tiny_v5_text_encoders)(root)
    return root


def _save(folder: Path, state_dict: dict, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
