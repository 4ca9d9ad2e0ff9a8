"""The V4 CLIP image encoder: loading (vision-only and full CLIP folders), features, preprocessing, refusals."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from easyanimate_core.image_encoder import CLIP_MEAN, CLIP_STD, load_image_encoder, preprocess
from tests.tiny_checkpoint import write_tiny_clip_image_encoder


def image(h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    """A random image [H, W, 3] on the 8-bit grid (as read from a file)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(h, w, 3, generator=g) * 255).round() / 255


def test_features_are_the_vision_tower_without_cls(tmp_path):
    write_tiny_clip_image_encoder(tmp_path)
    encoder = load_image_encoder(tmp_path)
    img = image()
    features = encoder.encode(img)
    assert features.shape == (1, 16, 32)  # 32 px / patch 8 -> 4 x 4 patches, CLS dropped
    pixels = preprocess(img, 32, (32, 32), CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        expected = encoder.model(pixel_values=pixels).last_hidden_state[:, 1:]
    assert torch.equal(features, expected)


def test_a_full_clip_checkpoint_loads_its_vision_half(tmp_path):
    """The release ships a whole CLIP ViT-L/14 (vision and text towers) in image_encoder/."""
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path / "image_encoder")
    encoder = load_image_encoder(tmp_path)
    img = image()
    pixels = preprocess(img, 32, (32, 32), CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
    assert torch.allclose(encoder.encode(img), expected, atol=1e-6)


def test_preprocessing_matches_clip_image_processor_within_one_8bit_level():
    transformers = pytest.importorskip("transformers")
    img = torch.nn.functional.interpolate(image(48, 80).permute(2, 0, 1)[None], size=(384, 672), mode="bilinear")
    img = (img[0].permute(1, 2, 0) * 255).round() / 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.CLIPImageProcessor()(images=(img.numpy() * 255).astype(np.uint8), return_tensors="pt")
    ours = preprocess(img, 224, (224, 224), CLIP_MEAN, CLIP_STD)
    one_level = 1 / 255 / min(CLIP_STD)
    assert ours.shape == reference["pixel_values"].shape == (1, 3, 224, 224)
    assert (ours - reference["pixel_values"]).abs().max() <= 1.5 * one_level


def test_preprocessor_config_is_read(tmp_path):
    folder = write_tiny_clip_image_encoder(tmp_path)
    settings = {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 8}, "image_mean": [0.5] * 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    encoder = load_image_encoder(tmp_path)
    assert encoder.settings["shortest_edge"] == 16 and encoder.settings["crop"] == (16, 8)
    assert encoder.settings["mean"] == (0.5, 0.5, 0.5) and encoder.settings["std"] == CLIP_STD


def test_pickle_weights_are_refused_with_the_conversion(tmp_path):
    folder = write_tiny_clip_image_encoder(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refusing pickle weights.*save_pretrained\("):
        load_image_encoder(tmp_path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="image_encoder/config.json missing"):
        load_image_encoder(tmp_path)


def test_bad_image_shape_is_refused(tmp_path):
    write_tiny_clip_image_encoder(tmp_path)
    with pytest.raises(ValueError, match=r"expected an image \[H, W, 3\]"):
        load_image_encoder(tmp_path).encode(torch.zeros(3, 32, 32))


def test_missing_vision_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_tiny_clip_image_encoder(tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["vision_model.post_layernorm.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack 1 tensor\(s\), e.g. .*post_layernorm.weight"):
        load_image_encoder(tmp_path)
