"""Tiny random text encoders and tokenizers, built offline, saved in an EasyAnimate checkpoint layout.

``write_tiny_v51_text_encoder(root)`` writes ``root/text_encoder`` (Qwen2VLForConditionalGeneration) and
``root/tokenizer`` (Qwen2Tokenizer with a Qwen2-VL-style chat template). ``write_tiny_v5_text_encoders(root)``
writes ``text_encoder`` (BertModel), ``tokenizer`` (BertTokenizer, 77 tokens), ``text_encoder_2``
(T5EncoderModel with an mT5-style gated-GELU config) and ``tokenizer_2`` (T5Tokenizer, 256 tokens). The same
folders serve V4. ``write_tiny_v3_text_encoder(root)`` writes V1-V3's ``text_encoder`` (a 4096-wide, 1-layer
T5-v1.1-style encoder: the released width, at a few MB) and ``tokenizer`` (T5Tokenizer), either as
``tokenizer.json`` or, with ``spiece=True``, as the sentencepiece ``spiece.model`` alone, as released. Nothing is
downloaded: vocabularies are written out here and weights are random (seeded); everything is saved with
``save_pretrained`` as safetensors.

The T5 tokenizer is the ``tokenizers``-backed ``T5Tokenizer`` built from an in-memory Unigram vocabulary and
saved as ``tokenizer.json``. The released checkpoints ship a sentencepiece ``spiece.model`` instead, which
transformers can only read with the ``sentencepiece`` and ``protobuf`` packages; ``tiny_spiece_model`` trains
one (Unigram, T5's pad 0 / eos 1 / unk 2 ids) on a fixed word list in a few milliseconds.
"""

from __future__ import annotations

import io
import json
import random
import string
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# Text-only part of Qwen2-VL-7B-Instruct's chat template (the image/video branches are not exercised).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
BERT_WORDS = ["a", "cat", "dog", "the", "on", "walks", "beach", "sunset", "blurry", "static", "低", "质", "量"]


def tiny_qwen2_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE over the 256 byte symbols (no merges) plus Qwen2-VL's special tokens and chat template."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen2_vl(tokenizer: Qwen2Tokenizer, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """A 3-layer, 32-wide Qwen2-VL (with a 1-block vision tower) whose special-token ids match ``tokenizer``."""
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval()


def tiny_bert_tokenizer() -> BertTokenizer:
    """A WordPiece vocabulary of a few words, single letters and ``##`` continuations, padded to 77 tokens."""
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS, *string.ascii_lowercase, ",", "."]
    pieces += [f"##{c}" for c in string.ascii_lowercase]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return BertTokenizer(vocab=vocab, model_max_length=77)


def tiny_bert(vocab_size: int, seed: int = 1) -> BertModel:
    """A 2-layer, 32-wide BERT text tower."""
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=True).eval()


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A Unigram vocabulary (pad, eos, unk, word pieces, letters) in T5's layout, padded to 256 tokens."""
    words = [f"▁{w}" for w in BERT_WORDS] + ["▁"] + [f"▁{c}" for c in string.ascii_lowercase]
    letters = list(string.ascii_lowercase) + [",", "."]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(w, -2.0) for w in words] + [(c, -5.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=256)


def tiny_mt5_encoder(vocab_size: int, seed: int = 2) -> T5EncoderModel:
    """A 2-layer, 32-wide T5 encoder with mT5's gated-GELU feed-forward."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def write_tiny_v51_text_encoder(root: str | Path) -> Path:
    """Write a tiny V5.1 ``text_encoder/`` + ``tokenizer/`` under ``root``; return ``root``."""
    root = Path(root)
    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    tiny_qwen2_vl(tokenizer).save_pretrained(root / "text_encoder")
    return root


def write_tiny_v5_text_encoders(root: str | Path) -> Path:
    """Write tiny V4/V5 ``text_encoder[_2]/`` + ``tokenizer[_2]/`` (BERT + mT5) under ``root``; return ``root``."""
    root = Path(root)
    bert_tokenizer = tiny_bert_tokenizer()
    bert_tokenizer.save_pretrained(root / "tokenizer")
    tiny_bert(len(bert_tokenizer)).save_pretrained(root / "text_encoder")
    t5_tokenizer = tiny_t5_tokenizer()
    t5_tokenizer.save_pretrained(root / "tokenizer_2")
    tiny_mt5_encoder(len(t5_tokenizer)).save_pretrained(root / "text_encoder_2")
    return root


def tiny_spiece_model(vocab_size: int = 40) -> bytes:
    """A sentencepiece Unigram model (pad 0, eos 1, unk 2, no bos, as T5's) trained on sentences of BERT_WORDS."""
    import sentencepiece

    rng = random.Random(0)
    words = [w for w in BERT_WORDS if w.isascii()] + ["dog", "video", "quality", "high", "low", "woman", "forest"]
    sentences = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    return model.getvalue()


def write_tiny_v3_text_encoder(root: str | Path, spiece: bool = False, d_model: int = 4096) -> Path:
    """Write a tiny V1-V3 ``text_encoder/`` (T5EncoderModel) + ``tokenizer/`` (T5Tokenizer) under ``root``.

    ``spiece=True`` writes the tokenizer as released (spiece.model + tokenizer_config.json with T5's 100 extra
    ids, no tokenizer.json); otherwise the Unigram ``tokenizer.json`` of ``tiny_t5_tokenizer``.
    """
    root = Path(root)
    folder = root / "tokenizer"
    if spiece:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spiece.model").write_bytes(tiny_spiece_model())
        config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 512}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        vocab_size = len(T5Tokenizer.from_pretrained(folder, local_files_only=True))
    else:
        tokenizer = tiny_t5_tokenizer()
        tokenizer.save_pretrained(folder)
        vocab_size = len(tokenizer)
    # T5-v1.1 (PixArt-alpha's text encoder) has mT5's architecture: gated-GELU, untied head. One thin layer keeps
    # the released 4096 width cheap (a few MB).
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=16,
        num_layers=1,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(3)
    T5EncoderModel(config).eval().save_pretrained(root / "text_encoder")
    return root
