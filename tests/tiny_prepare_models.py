"""Tiny random models for the ``easyanimate prepare`` model stages, built offline and saved with save_pretrained.

    write_tiny_clip(folder)                 CLIPModel (16 wide, 32 px input) + CLIPImageProcessor
    write_aesthetic_head(path, width, bias) a Linear chain (width -> 8 -> 1) whose output is ``bias`` + a small term
    write_tiny_llava(folder)                LlavaForConditionalGeneration (CLIP vision + 2-layer Qwen2) + processor
                                            with a chat template; its lm_head is zero, so greedy decoding repeats
                                            token 0 (a fixed, non-empty caption)

Nothing is downloaded; weights are random (seeded) and saved as safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.tiny_text_models import tiny_qwen2_tokenizer


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny CLIP image-text model folder (get_image_features gives 16-wide embeddings)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=text, vision_config={**vision, "image_size": 32, "patch_size": 8}, projection_dim=16
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_aesthetic_head(path: Path, width: int = 16, bias: float = 5.0, scale: float = 1.0, seed: int = 0) -> Path:
    """An aesthetic head file in the official key layout (``layers.<i>.weight`` / ``.bias``, Dropout slots
    between): Linear(width, 8) -> Linear(8, 1), random weights times ``scale``, the last bias ``bias``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "layers.0.weight": torch.randn(8, width, generator=generator) * scale,
        "layers.0.bias": torch.zeros(8),
        "layers.2.weight": torch.randn(1, 8, generator=generator) * scale,
        "layers.2.bias": torch.tensor([bias]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


def write_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A tiny LLaVA image-text-to-text folder with a processor and a Qwen2-style chat template."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"), vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy decoding picks token 0 every step
    template = tokenizer.chat_template.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
