"""The micro model's architecture: EasyAnimate V5.1 at micro width and depth, and its text encoder.

    VAE_CONFIG / vae_config()           mag VAE, blocks (32, 64, 64, 64): 8x spatial, 4x temporal, 16 latents
    transformer_config(variant)         MMDiT, 6 dual-stream blocks of width 128 (4 heads x 32), Qwen-width text
    build_tokenizer()                   Qwen2 byte-level BPE whose merges make every caption word one token
    build_text_encoder(tokenizer, seed) a 2-layer, 64-wide Qwen2-VL, random and frozen (see MODEL_CARD.md)
    write_initial_checkpoint(root, variant, seed)
        an untrained model folder in the official layout (transformer/, vae/, text_encoder/, tokenizer/)

The geometry is the released one (same layer names, 16 latent channels, patch 2, RMSNorm text projection),
so every loader, the pipeline, the CLI and the ComfyUI nodes treat the micro model as a V5.1 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..transformer import VARIANT_IN_CHANNELS, EasyAnimateTransformer3D, TransformerConfig
from ..vae import MagvitVAE, VAEConfig
from .data import ALL_COLOURS, BACKGROUNDS, DIRECTIONS, SHAPES, SPEEDS

TEXT_WIDTH = 64  # hidden size of the micro Qwen2-VL = the transformer's text_embed_dim
MAX_TOKENS = 32  # tokenizer model_max_length: the chat-templated caption is ~20 tokens
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Latent pixels per token side. The released models use 2; at 8x8 latents a 2x2 token covers 16x16 pixels and
# slow motion moves a quarter token per latent frame (see MODEL_CARD.md for what each setting learned).
PATCH_SIZE = 2
# The CLI's defaults for this model folder (generation_defaults.json): the size and length it was trained on.
GENERATION_DEFAULTS = {"width": 64, "height": 64, "frames": 17, "fps": 8, "steps": 25, "guidance": 6.0}

# vae/config.json: official (cache_mag_vae, mid_block_use_attention) and diffusers keys, both read by VAEConfig.
VAE_CONFIG = {
    "_class_name": "AutoencoderKLMagvit",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["SpatialDownBlock3D", "SpatialTemporalDownBlock3D", "SpatialTemporalDownBlock3D"]
    + ["SpatialTemporalDownBlock3D"],
    "up_block_types": ["SpatialUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D"]
    + ["SpatialTemporalUpBlock3D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "spatial_group_norm": True,
    "scaling_factor": 1.0,  # replaced by 1 / std of the trained VAE's latents
    "mid_block_use_attention": False,
    "cache_mag_vae": True,
    "mini_batch_encoder": 4,
    "mini_batch_decoder": 1,
}

# Words of every caption (and of the concepts kept for LoRAs), each made one token by the BPE merges.
CHAT_WORDS = ("user", "assistant", "system")
CAPTION_WORDS = ("a", "moving", "on", "background", "and", "diagonally")
EXTRA_WORDS = ("purple", "orange", "pink", "star", "static")  # unused by the base data: room for new concepts

# Qwen2-VL's chat layout without its default system turn (fewer tokens; the model is trained with this one).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def vae_config() -> VAEConfig:
    """The micro VAE's VAEConfig (as loaded from VAE_CONFIG)."""
    return VAEConfig.from_dict(VAE_CONFIG)


def transformer_config(variant: str = "InP", patch_size: int = PATCH_SIZE) -> TransformerConfig:
    """The micro MMDiT for ``variant`` ("T2V" or "InP"): 6 dual-stream blocks, width 128."""
    return TransformerConfig(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=VARIANT_IN_CHANNELS["V5.1"][variant],
        out_channels=16,
        patch_size=patch_size,
        num_layers=6,
        mmdit_layers=6,
        time_embed_dim=128,
        text_embed_dim=TEXT_WIDTH,
        add_norm_text_encoder=True,
    )


def vocabulary() -> list[str]:
    """Every word the tokenizer keeps whole: attribute names, caption glue, chat roles and spare concepts."""
    words = [*CAPTION_WORDS, *SHAPES, *ALL_COLOURS, *DIRECTIONS, *SPEEDS, *BACKGROUNDS, *CHAT_WORDS, *EXTRA_WORDS]
    return list(dict.fromkeys(w for phrase in words for w in phrase.split()))


def _chain(pieces: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that join ``pieces`` into one token."""
    return [("".join(pieces[:i]), pieces[i]) for i in range(1, len(pieces))]


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer) over ``vocab`` and ``merges``."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_TOKENS)


def build_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE) in which each vocabulary word, with or without a leading space, is one token.

    Merges are prefix chains ("Ġr"+"e" -> "Ġre", "Ġre"+"d" -> "Ġred"). Chains of space-prefixed words come
    first: BPE applies the lowest-ranked merge first, and only they start with "Ġ", so inside such a word
    the chain from its first symbol always wins. Bare words (the caption's first word follows a newline)
    can collide ("an" from "and" inside "triangle"): each word still split is then joined by merges
    appended after all others, which only act where no earlier merge does, until every word is one token.
    Other text falls back to byte tokens.
    """
    from tokenizers import pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []

    def add(pieces: list[str]) -> None:
        for pair in _chain(pieces):
            if pair not in merges:
                vocab.setdefault("".join(pair), len(vocab))
                merges.append(pair)

    words = vocabulary()
    for word in [f"Ġ{w}" for w in words] + words:
        add(list(word))
    texts = [f" {w}" for w in words] + words
    for _ in range(len(words)):
        tokenizer = _bpe(vocab, merges)
        split = [pieces for pieces in map(tokenizer.tokenize, texts) if len(pieces) > 1]
        if not split:
            break
        for pieces in split:
            add(pieces)
    else:
        raise RuntimeError(f"could not make every vocabulary word one token: {split}")
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_text_encoder(tokenizer, seed: int = 0):
    """A 2-layer, 64-wide Qwen2-VL with random (seeded) weights; ``hidden_states[-2]`` is its first layer's output."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4 * MAX_TOKENS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=TEXT_WIDTH, num_heads=2, patch_size=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval()


def save_model_folder(folder: Path, state_dict: dict[str, torch.Tensor], config: dict, dtype: torch.dtype) -> None:
    """``folder/config.json`` and ``folder/diffusion_pytorch_model.safetensors`` (tensors cast to ``dtype``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def transformer_json(config: TransformerConfig) -> dict:
    """transformer/config.json for ``config`` (our field names, which are the official ones)."""
    return {k: v for k, v in vars(config).items() if k != "compat" and v is not None}


def write_initial_checkpoint(
    root: str | Path, variant: str = "InP", seed: int = 0, patch_size: int = PATCH_SIZE
) -> Path:
    """An untrained micro model folder: random transformer and VAE (fp32), the text encoder and tokenizer.

    The text encoder depends only on its own seed (0), never on ``seed``: every micro model shares it.
    """
    root = Path(root)
    with atomic_dir(root) as tmp:
        torch.manual_seed(seed)  # each model from its own reseed: the VAE is the same for every variant
        config = transformer_config(variant, patch_size)
        save_model_folder(
            tmp / "transformer", EasyAnimateTransformer3D(config).state_dict(), transformer_json(config), torch.float32
        )
        torch.manual_seed(seed)
        save_model_folder(tmp / "vae", MagvitVAE(vae_config()).state_dict(), VAE_CONFIG, torch.float32)
        write_text_encoder(tmp)
        write_generation_defaults(tmp)
    return root


def write_generation_defaults(root: Path) -> None:
    """``root/generation_defaults.json``: the CLI generates 17 frames at 64 x 64 unless told otherwise."""
    from . import DEFAULTS_FILE

    (root / DEFAULTS_FILE).write_text(json.dumps(GENERATION_DEFAULTS, indent=1) + "\n", encoding="utf-8")


def write_text_encoder(root: Path) -> None:
    """``root/tokenizer`` and ``root/text_encoder`` (safetensors, fp32) of the micro model."""
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    build_text_encoder(tokenizer).save_pretrained(root / "text_encoder", safe_serialization=True)
