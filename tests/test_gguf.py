"""GGUF transformers: our block formats against the gguf package's, files written by ``easyanimate quantize``
loaded back through the real loading code, and every format we cannot read refused with the fix."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from easyanimate_core import load_transformer
from easyanimate_core.cli import main
from easyanimate_core.quant.blocks import dequantize, quantize
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package (pip install -e '.[test]')")

# Rows of 256 values (K blocks) in every Linear of the blocks: 4 heads of 64.
CONFIG = dict(num_attention_heads=4, attention_head_dim=64, in_channels=33, out_channels=16, num_layers=2,
              mmdit_layers=1, time_embed_dim=256, text_embed_dim=256, add_norm_text_encoder=True)  # fmt: skip
# Output error of the tiny model against float32 (relative, L2), per format: Q8_0 / F16 near lossless, the K
# formats within their blocks' precision.
TOLERANCE = {"Q8_0": 0.02, "F16": 0.002, "Q5_K": 0.08, "Q4_K": 0.16}


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "Q5_K", "F16", "BF16"])
def test_our_blocks_read_back_exactly_as_the_gguf_package_reads_them(kind):
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    raw = quantize(w, kind)
    ours = dequantize(raw, kind, tuple(w.shape), torch.float32)
    reference = gguf.quants.dequantize(raw.numpy(), getattr(gguf.GGMLQuantizationType, kind)).reshape(w.shape)
    np.testing.assert_array_equal(ours.numpy(), reference)
    assert (ours - w).norm() / w.norm() < 0.1
    if kind == "Q8_0":  # the gguf package quantizes Q8_0 too: same bytes
        np.testing.assert_array_equal(raw.numpy(), gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_model")
    torch.manual_seed(0)
    transformer = EasyAnimateTransformer3D(TransformerConfig(**CONFIG))
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.05)
    (root / "transformer").mkdir()
    save_file(transformer.state_dict(), root / "transformer" / "diffusion_pytorch_model.safetensors")
    return root


def outputs(transformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    inpaint = torch.randn(1, 17, 2, 4, 4, generator=g)
    text = torch.randn(1, 5, 256, generator=g)
    with torch.no_grad():
        return transformer(x, torch.tensor([500.0]), text, inpaint_latents=inpaint)


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_K", "Q4_K", "F16"])
def test_a_quantized_file_loads_and_matches_the_float_model(model_folder, tmp_path, kind, capsys):
    out = tmp_path / f"model-{kind}.gguf"
    assert main(["quantize", str(model_folder), str(out), "--type", kind]) == 0
    assert f"tensors {kind}" in capsys.readouterr().out
    reference = outputs(load_transformer(model_folder))
    loaded = load_transformer(out, dtype=torch.float32)  # None would keep F16's half precision
    assert loaded.info.version == "V5.1" and loaded.info.variant == "InP"
    quantized = [m for m in loaded.modules() if getattr(m, "quant_kind", None)]
    if kind != "F16":
        assert quantized and all(m.weight.dtype == torch.uint8 for m in quantized)  # kept in blocks
    error = float((outputs(loaded) - reference).norm() / reference.norm())
    assert error < TOLERANCE[kind], f"{kind}: relative error {error:.4f}"
    smaller = out.stat().st_size < (model_folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert smaller


def test_a_gguf_transformer_in_a_model_folder_is_found(model_folder, tmp_path):
    folder = tmp_path / "folder"
    (folder / "transformer").mkdir(parents=True)
    assert main(["quantize", str(model_folder), str(folder / "transformer" / "model.gguf")]) == 0
    assert load_transformer(folder).info.variant == "InP"


def test_formats_we_cannot_read_are_refused_naming_the_fix(model_folder, tmp_path):
    path = tmp_path / "q2k.gguf"
    writer = gguf.GGUFWriter(str(path), "easyanimate")
    writer.add_tensor("proj.weight", np.zeros((16, 84), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"proj.weight is stored as Q2_K, which this pack does not read .*quantize"):
        load_transformer(path)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_transformer(broken)


def test_quantize_refuses_bad_outputs_before_reading_weights(model_folder, tmp_path, capsys):
    existing = tmp_path / "x.gguf"
    existing.write_bytes(b"mine")
    assert main(["quantize", str(model_folder), str(existing)]) == 2
    assert re.search(r"x.gguf exists; pass --overwrite", capsys.readouterr().err) and existing.read_bytes() == b"mine"
    assert main(["quantize", str(model_folder), str(tmp_path / "x.safetensors")]) == 2
    assert "the output of quantize is a .gguf file" in capsys.readouterr().err
    assert json.loads(json.dumps(CONFIG))  # the config above is plain data (written into the file's metadata)
