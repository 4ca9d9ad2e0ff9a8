"""The `easyanimate` command line."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from easyanimate_core.cli import main
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig
from easyanimate_core.vae import MagvitVAE, VAEConfig


def test_info_on_a_model_root_lists_parts_and_what_is_missing(tmp_path, capsys):
    transformer = EasyAnimateTransformer3D(
        TransformerConfig(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=33,
            num_layers=1,
            mmdit_layers=1,
            time_embed_dim=8,
            text_embed_dim=12,
            add_norm_text_encoder=True,
        )
    )
    (tmp_path / "transformer").mkdir()
    save_file(transformer.state_dict(), tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    vae_cfg = VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    (tmp_path / "vae").mkdir()
    save_file(MagvitVAE(vae_cfg).state_dict(), tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"norm_num_groups": 4, "cache_mag_vae": True}))
    (tmp_path / "tokenizer").mkdir()

    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "EasyAnimate V5.1 transformer" in out and "variant: InP" in out
    assert "EasyAnimate V5.1 vae" in out and "variant: mag" in out
    assert "text_encoder: missing" in out and "tokenizer: present" in out


def test_info_reports_a_bad_file_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"x")
    assert main(["info", str(bad)]) == 2
    assert "refusing to load a pickle-based checkpoint" in capsys.readouterr().err


def test_info_on_a_single_vae_file(tmp_path, capsys):
    sd = MagvitVAE(VAEConfig(latent_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=1)).state_dict()
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "vae.safetensors")
    assert main(["info", str(tmp_path / "vae.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "EasyAnimate V4 vae" in out and "BF16" in out
