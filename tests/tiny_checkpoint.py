"""Tiny random V1-V5.1 checkpoints written to disk in the official layout (transformer/, vae/, text encoders,
and for V4 / V3 InP the CLIP image_encoder/)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from easyanimate_core.image_vae import ImageVAE, ImageVAEConfig
from easyanimate_core.transformer import VARIANT_IN_CHANNELS, EasyAnimateTransformer3D, TransformerConfig
from easyanimate_core.transformer_v3 import V1_XL, V2_XL, V3_XL_INP, EasyAnimateV3Transformer3D
from easyanimate_core.transformer_v4 import EasyAnimateV4Transformer3D, TransformerV4Config
from easyanimate_core.vae import MagvitVAE, VAEConfig
from tests.tiny_text_models import (
    write_tiny_v3_text_encoder,
    write_tiny_v5_text_encoders,
    write_tiny_v51_text_encoder,
)

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


V4_VAE_CONFIG = {
    "latent_channels": 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 2,  # the "3d" mid-block attention sits between two resnets
    "norm_num_groups": 4,
    "spatial_group_norm": False,
    "scaling_factor": 0.1825,
    "mid_block_use_attention": True,
    "mid_block_attention_type": "3d",
    "cache_compression_vae": True,
    "mini_batch_encoder": 8,
    "mini_batch_decoder": 2,
}
CLIP_HIDDEN = TEXT_HIDDEN  # the tiny CLIP's width; as released, equal to the BERT width (no kv projection)
V4_IN_CHANNELS = {"T2V": 4, "InP": 12}


def write_tiny_checkpoint(root: str | Path, variant: str = "InP", seed: int = 0, version: str = "V5.1") -> Path:
    """Write transformer/ (official keys), vae/ and the tiny text encoder(s) under ``root``; return ``root``.

    ``version="V4"`` writes the HunyuanDiT-style V4 transformer (variant "InP" or "T2V"), a slice VAE, BERT + mT5
    and (InP) a tiny CLIP vision ``image_encoder/``.
    """
    root = Path(root)
    torch.manual_seed(seed)
    if version == "V4":
        return _write_tiny_v4(root, variant)
    if version in PIXART_RELEASES:
        return _write_tiny_pixart(root, version)
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


def tiny_v4_config(variant: str = "InP") -> TransformerV4Config:
    """A 4-block V4 geometry (one long skip) reading the tiny BERT / mT5 / CLIP widths."""
    return TransformerV4Config(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=V4_IN_CHANNELS[variant],
        out_channels=8,
        num_layers=4,
        mlp_ratio=2.0,
        cross_attention_dim=TEXT_HIDDEN,
        cross_attention_dim_t5=TEXT_HIDDEN,
        pooled_projection_dim=16,
        n_query=4,
        projection_dim=CLIP_HIDDEN,
    )


def write_tiny_clip_image_encoder(root: Path, projection_dim: int = 16) -> Path:
    """``root/image_encoder``: a 1-layer CLIP vision tower on 32 px images (16 patch tokens), safetensors; V3 reads
    its projection, 768 wide as released (``projection_dim``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=projection_dim,
    )
    folder = root / "image_encoder"
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)
    processor = {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}, "do_resize": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def _write_tiny_v4(root: Path, variant: str) -> Path:
    config = tiny_v4_config(variant)
    transformer = EasyAnimateV4Transformer3D(config)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    saved = {**vars(config), "hidden_size": config.inner_dim, "compat": None, "rope_in_first_block": None}
    _save(root / "transformer", transformer.state_dict(), saved)
    vae = MagvitVAE(VAEConfig.from_dict(V4_VAE_CONFIG))
    _save(root / "vae", vae.state_dict(), V4_VAE_CONFIG)
    write_tiny_v5_text_encoders(root)
    if variant == "InP":
        write_tiny_clip_image_encoder(root)
    return root


# V1-V3 (PixArt-motion): 28 blocks as released (the official class always builds its 13 long skips); T5 32 wide.
# 64 wide: the motion modules' GroupNorm has 32 groups, and one channel a group over a few tokens is so
# ill-conditioned (1e-7 in, 0.3 out) that float rounding alone would make runs incomparable.
PIXART_RELEASES = {"V3": V3_XL_INP, "V2": V2_XL, "V1": V1_XL}
T5_HIDDEN = 32
PIXART_TINY = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    num_layers=28,
    caption_channels=T5_HIDDEN,
    sample_size=8,
    motion_heads_even=2,
    motion_heads_odd=2,
)
IMAGE_VAE_CONFIG = {  # a diffusers AutoencoderKL config.json, 2 levels (2x spatial compression)
    "latent_channels": 4,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "scaling_factor": 0.18215,
}


def tiny_pixart_config(version: str):
    """The tiny geometry of a V1 / V2 / V3 release (its motion layout, input channels and U-ViT kept)."""
    return PIXART_RELEASES[version].replace(**PIXART_TINY)


def pixart_motion_config(version: str) -> dict:
    """A transformer/config.json for a tiny V1-V3 release: PixArt's keys plus the release yaml's motion keys."""
    cfg = tiny_pixart_config(version)

    def motion(heads: int, kinds: tuple[str, ...]) -> dict:
        return {
            "num_attention_heads": heads,
            "num_transformer_block": cfg.motion_layers,
            "attention_block_types": [f"{k}_Self" for k in kinds],
            "temporal_position_encoding": True,
            "temporal_position_encoding_max_len": 4096,
            "block_size": cfg.motion_block_size,
        }

    config = {
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.num_layers,
        "sample_size": cfg.sample_size,
        "caption_channels": cfg.caption_channels,
        "cross_attention_dim": cfg.inner_dim,
        "patch_size": cfg.patch_size,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": cfg.norm_eps,
        "attention_bias": cfg.attention_bias,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "motion_module_type": "VanillaGrid" if cfg.motion_block_size > 1 else "Vanilla",
        "enable_uvit": cfg.enable_uvit,
    }
    if version == "V3":
        config["basic_block_type"] = "global_motionmodule"
        config["motion_module_kwargs_even"] = motion(cfg.motion_heads_even, cfg.motion_even)
        config["motion_module_kwargs_odd"] = motion(cfg.motion_heads_odd, cfg.motion_odd)
    else:
        config["basic_block_type"] = "motionmodule"
        config["motion_module_kwargs"] = motion(cfg.motion_heads_even, cfg.motion_even)
    return config


def _write_tiny_pixart(root: Path, version: str) -> Path:
    config = tiny_pixart_config(version)
    transformer = EasyAnimateV3Transformer3D(config)
    with torch.no_grad():
        for p in transformer.parameters():
            # The zero-initialised layers (motion proj_out, long skips, adaLN tables) get small weights: they must
            # matter, yet 28 blocks must not blow the prediction up (a chaotic model hides real differences).
            if not p.any():
                p.add_(torch.randn_like(p) * 0.02)
    _save(root / "transformer", transformer.state_dict(), pixart_motion_config(version))
    if version == "V1":
        vae = ImageVAE(ImageVAEConfig.from_dict(IMAGE_VAE_CONFIG))
        _save(root / "vae", vae.state_dict(), IMAGE_VAE_CONFIG)
    else:
        vae_config = PIXART_VAE_CONFIGS[version]
        _save(root / "vae", MagvitVAE(VAEConfig.from_dict(vae_config)).state_dict(), vae_config)
    write_tiny_v3_text_encoder(root, d_model=T5_HIDDEN)
    if version == "V3":
        write_tiny_clip_image_encoder(root, projection_dim=768)
    return root


# V2 / V3 MagViT VAEs: config.json in the V2/V3-era class's own form (ch / ch_mult, slice_compression_vae), V4's
# tiny graph (widths 8, 16, 32, 32).
_PIXART_VAE = {
    "ch": 8,
    "ch_mult": [1, 2, 4, 4],
    "block_out_channels": [8, 16, 32, 32],  # not a constructor argument; the official pipelines read it
    "latent_channels": 4,
    "norm_num_groups": 4,
    "layers_per_block": 2,
    "mid_block_use_attention": True,
    "mid_block_attention_type": "3d",
    "down_block_types": ["SpatialDownBlock3D"] + ["SpatialTemporalDownBlock3D"] * 3,
    "up_block_types": ["SpatialUpBlock3D"] + ["SpatialTemporalUpBlock3D"] * 3,
}
PIXART_VAE_CONFIGS = {
    "V3": {**_PIXART_VAE, "slice_compression_vae": True, "mini_batch_encoder": 8, "mini_batch_decoder": 2},
    "V2": {**_PIXART_VAE, "slice_compression_vae": False, "mini_batch_encoder": 9, "mini_batch_decoder": 3},
}
