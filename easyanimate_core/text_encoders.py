"""Text encoders of EasyAnimate V1-V3 (T5), V4 / V5 (BERT + mT5) and V5.1 (Qwen2-VL), from a checkpoint's folders.

Layout under a checkpoint root:
    V1-V3  text_encoder/ (T5EncoderModel: PixArt-alpha's T5-v1.1-XXL, 4096 wide), tokenizer/ (T5Tokenizer)
    V5.1   text_encoder/ (Qwen2VLForConditionalGeneration), tokenizer/ (Qwen2Tokenizer with a chat template)
    V4/V5  text_encoder/ (BertModel), tokenizer/ (BertTokenizer, 77 tokens),
           text_encoder_2/ (T5EncoderModel holding mT5), tokenizer_2/ (T5Tokenizer, 256 tokens)

What each version feeds the transformer (official EasyAnimate pipelines, which diffusers 0.42.1 matches for V5.1):
    V1-V3 (one kind, "v3"; the official encode_prompt is the same at fb0916f (V2) and f9eeabe (V3)): each prompt
          is lower-cased and stripped, padded / truncated to 120 tokens (with T5's </s>), run with its attention
          mask; the conditioning is ``last_hidden_state`` -> embeds [B, 120, 4096], mask [B, 120]. The negative
          prompt (PixArt's default "") gets the same treatment. The mask also goes to the transformer.
          Caption cleaning: the official pipeline's ``clean_caption`` (default True in ``__call__``, which the
          predict scripts keep) runs DeepFloyd IF's ``_clean_caption`` only when beautifulsoup4 and ftfy are
          installed (the official requirements list both), and otherwise falls back, with a warning, to
          ``text.lower().strip()``. We do not depend on those packages and always take the fallback: prompts
          with URLs, HTML, CJK characters, odd dashes/quotes or "a,b" punctuation tokenize differently from an
          official install; plain prompts are unaffected beyond lower-casing.
    V5.1  each prompt is one user chat turn with one text part, rendered by the tokenizer's chat template with
          ``add_generation_prompt=True``, right-padded / truncated to 256 tokens, run with its attention mask;
          the conditioning is ``hidden_states[-2]`` -> embeds [B, 256, H], mask [B, 256].
    V4    BERT and mT5 ``last_hidden_state`` with their attention masks -> embeds [B, 77, H1], mask [B, 77],
          embeds_2 [B, 256, H2], mask_2 [B, 256].
    V5    the same, but both encoders run WITHOUT the mask (the V5 config sets enable_text_attention_mask
          false), so padding tokens are attended to. The tokenizer masks are still returned.
Sequence lengths are min(tokenizer.model_max_length, 256), as in the official code at HEAD (diffusers: 256 for
Qwen). The V4-era official code instead re-tokenised the decoded first 140 tokens (special tokens included); the
released code no longer does, and neither do we.

Only ``transformers`` is used (with ``local_files_only=True``); nothing is downloaded, and pickle weights
are refused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import transformers

from .loading import V3_FAMILY, check_safetensors, inspect_checkpoint

logger = logging.getLogger(__name__)

VERSIONS = ("v3", "v4", "v5", "v5.1")
# V1 and V2 use V3's text encoder and prompt path exactly: they are one kind, named "v3".
VERSION_ALIASES = {"v1": "v3", "v2": "v3"}
# The V4-V5.1 pipelines cap every tokenizer at actual_max_sequence_length = 256.
MAX_SEQUENCE_LENGTH = 256
# The V1-V3 pipelines pass max_sequence_length=120 (PixArt-alpha's T5 length), whatever the tokenizer allows.
V3_MAX_SEQUENCE_LENGTH = 120
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class PromptEmbeds:
    """Encoded prompts: ``embeds``/``mask`` from the first encoder, ``embeds_2``/``mask_2`` from mT5 (V4/V5)."""

    embeds: torch.Tensor
    mask: torch.Tensor
    embeds_2: torch.Tensor | None = None
    mask_2: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of prompts."""
        return self.embeds.shape[0]

    def _map(self, fn) -> PromptEmbeds:
        """Apply ``fn(name, tensor)`` to every tensor field that is set."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: fn(name, v) for name, v in values.items() if v is not None})

    def to(self, device=None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """Move to ``device``; ``dtype`` applies to the embeddings only (masks keep their integer type)."""
        return self._map(lambda name, t: t.to(device=device, dtype=dtype if name.startswith("embeds") else None))

    def rows(self, index: slice | int) -> PromptEmbeds:
        """The prompts at ``index`` (kept as a batch)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return self._map(lambda _, t: t[index])

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Each prompt ``n`` times in a row (``num_videos_per_prompt``)."""
        return self._map(lambda _, t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch."""
        first = items[0]
        return first._map(lambda name, _: torch.cat([getattr(item, name) for item in items]))


class PromptPair(NamedTuple):
    """Positive and negative prompts encoded the same way."""

    positive: PromptEmbeds
    negative: PromptEmbeds

    def for_cfg(self) -> PromptEmbeds:
        """[negative; positive], the batch order both pipelines use for classifier-free guidance."""
        return PromptEmbeds.cat([self.negative, self.positive])


def normalize_version(version: str) -> str:
    """'V5.1' / '5.1' / 'v5.1' -> 'v5.1'; 'V1' / 'V2' / 'V3' -> 'v3' (one text path); ValueError for anything else."""
    name = str(version).strip().lower()
    name = name if name.startswith("v") else f"v{name}"
    name = VERSION_ALIASES.get(name, name)
    if name not in VERSIONS:
        raise ValueError(
            f"unknown EasyAnimate version {version!r}; expected one of {', '.join(VERSIONS)} (v1 and v2 mean v3)"
        )
    return name


def _read_json(path: Path) -> dict:
    """A JSON file as a dict (ValueError naming the file if it is not valid JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); download the file again") from error


def detect_version(root: str | Path) -> str:
    """'v5.1' for a Qwen2-VL text encoder, 'v3' for T5 beside a V1/V2/V3 transformer; ValueError for BERT (V4 and V5
    share it) or anything else."""
    root = Path(root)
    config_path = root / "text_encoder" / "config.json"
    if not config_path.is_file():
        raise ValueError(f"text_encoder/config.json missing under {root}; download the full model folder")
    model_type = _read_json(config_path).get("model_type")
    if model_type == "qwen2_vl":
        return "v5.1"
    if model_type == "t5":
        return _t5_root_version(root)
    if model_type == "bert":
        raise ValueError(
            f"{root}: BERT + mT5 text encoders serve both V4 (run with attention masks) and V5 (without); "
            "pass version='v4' or version='v5'"
        )
    raise ValueError(f"{config_path}: unknown text encoder model_type {model_type!r} (expected qwen2_vl, bert or t5)")


def _t5_root_version(root: Path) -> str:
    """'v3' when the transformer beside a lone T5 text encoder is a V1/V2/V3 one, as its tensors say."""
    try:
        info = inspect_checkpoint(root, "transformer")
    except ValueError as error:
        raise ValueError(
            f"{root}: text_encoder is T5, but the transformer beside it could not be read to tell the version "
            f"({error}); pass version='v3' for an EasyAnimate V1-V3 model"
        ) from error
    if info.version not in V3_FAMILY:
        raise ValueError(
            f"{root}: text_encoder is T5 (EasyAnimate V1-V3), but transformer/ holds a {info.version} transformer; "
            f"{info.version} uses other text encoders: download that model folder again"
        )
    return "v3"


def _missing_weights(root: Path, folder: str) -> tuple[list[str], list[str]]:
    """(missing safetensors files, pickle files found instead) for the model in ``root/folder``."""
    path = root / folder
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [f"{folder}/{shard}" for shard in shards if not (path / shard).is_file()], []
    if (path / "model.safetensors").is_file():
        return [], []
    pickles = [f"{folder}/{name}" for name in PICKLE_WEIGHTS if (path / name).is_file()]
    return ([] if pickles else [f"{folder}/model.safetensors"]), pickles


def _missing_tokenizer_files(root: Path, folder: str, kind: str) -> list[str]:
    """Tokenizer files absent from ``root/folder``; alternatives are named together ("a or b")."""
    path = root / folder
    missing = [f"{folder}/tokenizer_config.json"] if not (path / "tokenizer_config.json").is_file() else []
    has = {name: (path / name).is_file() for name in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt")}
    if kind == "qwen":
        if not (has["tokenizer.json"] or (has["vocab.json"] and has["merges.txt"])):
            missing.append(f"{folder}/tokenizer.json (or vocab.json + merges.txt)")
        if not missing and not _has_chat_template(path):
            missing.append(f"{folder}/chat_template.jinja (or a chat_template in tokenizer_config.json)")
    elif kind == "bert":
        if not (has["tokenizer.json"] or has["vocab.txt"]):
            missing.append(f"{folder}/vocab.txt (or tokenizer.json)")
    elif not (has["tokenizer.json"] or (path / "spiece.model").is_file()):
        missing.append(f"{folder}/spiece.model (or tokenizer.json)")
    return missing


def _has_chat_template(path: Path) -> bool:
    """Whether a tokenizer folder carries a chat template in any of the places transformers reads it from."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    return bool(_read_json(path / "tokenizer_config.json").get("chat_template"))


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package ("google" for "google.protobuf")
        return False


def _needs_sentencepiece(root: Path, folder: str) -> bool:
    """Whether the T5 tokenizer exists only as spiece.model, which transformers converts with sentencepiece."""
    path = root / folder
    return (path / "spiece.model").is_file() and not (path / "tokenizer.json").is_file()


def check_text_encoder_files(root: str | Path, version: str) -> None:
    """Raise ValueError, before any weights are read, if a folder or file the version needs is absent."""
    root, version = Path(root), normalize_version(version)
    two_towers = version in ("v4", "v5")
    tokenizers = {
        "v3": [("tokenizer", "t5")],
        "v5.1": [("tokenizer", "qwen")],
    }.get(version, [("tokenizer", "bert"), ("tokenizer_2", "t5")])
    models = ["text_encoder", "text_encoder_2"] if two_towers else ["text_encoder"]
    missing, pickles = [], []
    for folder in models:
        if not (root / folder / "config.json").is_file():
            missing.append(f"{folder}/config.json")
        absent, found = _missing_weights(root, folder)
        missing += absent
        pickles += found
    for folder, kind in tokenizers:
        missing += _missing_tokenizer_files(root, folder, kind)
    if missing:
        raise ValueError(f"{', '.join(missing)} missing under {root}; download the full model folder")
    if pickles:
        raise ValueError(
            f"{', '.join(pickles)} under {root}: refusing pickle weights, because unpickling can run arbitrary code. "
            "Use the model.safetensors release of this text encoder, or convert it once in a trusted environment "
            "(from_pretrained(...).save_pretrained(..., safe_serialization=True))."
        )
    for folder in models:  # a truncated or corrupt file is named here, not as the safetensors library's raw error
        for weights in sorted((root / folder).glob("*.safetensors")):
            check_safetensors(weights)
    t5_folder = "tokenizer" if version == "v3" else "tokenizer_2" if two_towers else None
    if t5_folder and _needs_sentencepiece(root, t5_folder):
        absent = [name for name in ("sentencepiece", "google.protobuf") if not _importable(name)]
        if absent:
            raise ValueError(
                f"{root}/{t5_folder} holds only spiece.model; transformers needs the sentencepiece and protobuf "
                f"packages to read it (pip install sentencepiece protobuf). Missing: {', '.join(absent)}"
            )


def _dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """from_pretrained's dtype argument, whose name changed in transformers 5 (torch_dtype -> dtype)."""
    if dtype is None:
        return {}
    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


def _frozen(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model`` set up for inference (eval mode, no gradients) and moved to ``device``."""
    return model.requires_grad_(False).eval().to(device)


class TextEncoders:
    """The text encoder(s) and tokenizer(s) of one EasyAnimate checkpoint, with a small prompt cache.

    Build with ``load_text_encoders``. ``encode`` returns a ``PromptPair``; encodings are cached per prompt
    text (they depend on nothing else), so reruns with other seeds skip the encoders. ``to(device)`` and
    ``offload()`` move the encoders (not the cache) for the memory modes.
    """

    def __init__(
        self,
        version: str,
        tokenizer,
        text_encoder: torch.nn.Module,
        tokenizer_2=None,
        text_encoder_2: torch.nn.Module | None = None,
        cache_size: int = 8,
    ):
        self.version = normalize_version(version)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        if self.version in ("v4", "v5") and (tokenizer_2 is None or text_encoder_2 is None):
            raise ValueError(f"{self.version} needs tokenizer_2 and text_encoder_2 (mT5)")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, PromptEmbeds] = OrderedDict()

    @property
    def device(self) -> torch.device:
        """Where the (first) text encoder's weights are."""
        return next(self.text_encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The (first) text encoder's weight dtype, which its embeddings also have."""
        return next(self.text_encoder.parameters()).dtype

    def max_length(self, tokenizer) -> int:
        """Padded sequence length for ``tokenizer``: 120 for V1-V3, else its model_max_length, at most 256."""
        if self.version == "v3":
            return V3_MAX_SEQUENCE_LENGTH
        return min(int(tokenizer.model_max_length), MAX_SEQUENCE_LENGTH)

    def to(self, device) -> TextEncoders:
        """Move the encoders to ``device``; returns self."""
        for model in (self.text_encoder, self.text_encoder_2):
            if model is not None:
                model.to(device)
        return self

    def offload(self) -> TextEncoders:
        """Move the encoders to the CPU, freeing accelerator memory; returns self."""
        return self.to("cpu")

    def clear_cache(self) -> None:
        """Forget every cached encoding."""
        self._cache.clear()

    def encode(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None) -> PromptPair:
        """Encode prompts and negative prompts (default ""; one string is used for every prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if negative_prompts is None or isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts or ""] * len(prompts)
        negative_prompts = list(negative_prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        return PromptPair(self.encode_texts(prompts), self.encode_texts(negative_prompts))

    def encode_texts(self, texts: Sequence[str]) -> PromptEmbeds:
        """Encode a batch of texts, reusing cached rows; uncached texts are encoded together in one batch."""
        texts = list(texts)
        if not texts:
            raise ValueError("no prompts to encode")
        todo = [text for text in dict.fromkeys(texts) if text not in self._cache]
        fresh = dict(zip(todo, self._split(self._encode_batch(todo)), strict=True)) if todo else {}
        rows = [fresh[text] if text in fresh else self._cache[text] for text in texts]
        for text, row in fresh.items():
            self._remember(text, row)
        for text in texts:
            if text in self._cache:
                self._cache.move_to_end(text)
        return PromptEmbeds.cat(rows)

    def _split(self, batch: PromptEmbeds) -> list[PromptEmbeds]:
        """One single-prompt PromptEmbeds per row."""
        return [batch.rows(i) for i in range(batch.batch_size)]

    def _remember(self, text: str, row: PromptEmbeds) -> None:
        """Cache one encoding, evicting the least recently used beyond ``cache_size``."""
        if self.cache_size <= 0:
            return
        # A copy, so the cache does not keep the whole batch tensor alive through a view.
        self._cache[text] = row._map(lambda _, t: t.clone())
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    @torch.no_grad()
    def _encode_batch(self, texts: list[str]) -> PromptEmbeds:
        """Run the encoder(s) of this version on ``texts`` (no cache)."""
        if self.version == "v5.1":
            embeds, mask = self._encode_qwen(texts)
            return PromptEmbeds(embeds, mask)
        if self.version == "v3":
            # The official no-bs4/ftfy caption path (module docstring); the T5 runs with its mask.
            cleaned = [text.lower().strip() for text in texts]
            return PromptEmbeds(*self._encode_with(self.tokenizer, self.text_encoder, cleaned, use_mask=True))
        use_mask = self.version == "v4"
        embeds, mask = self._encode_with(self.tokenizer, self.text_encoder, texts, use_mask)
        embeds_2, mask_2 = self._encode_with(self.tokenizer_2, self.text_encoder_2, texts, use_mask)
        return PromptEmbeds(embeds, mask, embeds_2, mask_2)

    def _tokenize(self, tokenizer, texts: list[str], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), padded to and truncated at ``max_length``; warns about truncation."""
        max_length = self.max_length(tokenizer)
        lengths = [len(ids) for ids in tokenizer(texts, **kwargs).input_ids]
        if max(lengths) > max_length:
            logger.warning("a prompt has %d tokens; only the first %d are used", max(lengths), max_length)
        inputs = tokenizer(
            texts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
            **kwargs,
        )
        return inputs.input_ids, inputs.attention_mask

    def _encode_with(self, tokenizer, encoder, texts: list[str], use_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT / mT5 / T5: ``last_hidden_state``, run with the attention mask only when ``use_mask`` (V1-V4)."""
        device = next(encoder.parameters()).device
        ids, mask = self._tokenize(tokenizer, texts)
        ids, mask = ids.to(device), mask.to(device)
        # V5 was trained with unmasked encoders (padding tokens attended to); feeding the mask would change it.
        output = encoder(ids, attention_mask=mask) if use_mask else encoder(ids)
        return output[0], mask

    def _encode_qwen(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2-VL: chat-template each prompt, right-pad to 256, take ``hidden_states[-2]``."""
        chats = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": text}]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for text in texts
        ]
        ids, mask = self._tokenize(self.tokenizer, chats, padding_side="right")
        ids, mask = ids.to(self.device), mask.to(self.device)
        output = _qwen_backbone(self.text_encoder)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return output.hidden_states[-2], mask


def _qwen_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward gives Qwen2-VL's hidden states without computing vocabulary logits.

    Since transformers 4.52 ``model.model`` is Qwen2VLModel (multimodal RoPE positions + language model), so
    calling it skips the LM head. Earlier versions put the RoPE-position logic in the outer class, so the full
    model is called there.
    """
    inner = getattr(model, "model", None)
    return inner if hasattr(inner, "language_model") else model


def _drop_unused_qwen_parts(model: torch.nn.Module) -> None:
    """Free the vision tower and, where the backbone is called directly, the LM head (text-only use)."""
    inner = getattr(model, "model", None)
    if hasattr(inner, "language_model"):
        if hasattr(inner, "visual"):
            del inner.visual
        if isinstance(getattr(model, "lm_head", None), torch.nn.Module):
            # The LM head may share its weight with the input embeddings; deleting the module frees it otherwise.
            del model.lm_head
    elif hasattr(model, "visual"):
        del model.visual


def load_text_encoders(
    root: str | Path,
    version: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    text_only: bool = True,
    cache_size: int = 8,
) -> TextEncoders:
    """Load the text encoder(s) of the checkpoint at ``root`` for ``version`` ('v3', 'v4', 'v5', 'v5.1'; 'v1' and
    'v2' mean 'v3').

    ``version=None`` detects V5.1 from a Qwen2-VL config and V1-V3 from a T5 config beside a V1-V3 transformer
    (V4 and V5 must be named: they differ only in mask use). ``dtype=None`` keeps transformers' default.
    ``text_only`` frees Qwen2-VL's vision tower and LM head after loading (they are never used for prompts).
    ``cache_size`` prompt texts are remembered (0 disables).
    Files are checked before any weights are read.
    """
    root = Path(root)
    version = detect_version(root) if version is None else normalize_version(version)
    check_text_encoder_files(root, version)
    detected = _read_json(root / "text_encoder" / "config.json").get("model_type")
    expected = {"v3": "t5", "v5.1": "qwen2_vl"}.get(version, "bert")
    if detected != expected:
        raise ValueError(f"{root}/text_encoder is {detected!r}, but {version} uses {expected}")
    common = dict(local_files_only=True, **_dtype_kwargs(dtype))
    options = dict(cache_size=cache_size)
    if version == "v5.1":
        tokenizer = transformers.Qwen2Tokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
            root / "text_encoder", use_safetensors=True, **common
        )
        if text_only:
            _drop_unused_qwen_parts(model)
        return TextEncoders(version, tokenizer, _frozen(model, device), **options)
    if version == "v3":
        tokenizer = transformers.T5Tokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        t5 = transformers.T5EncoderModel.from_pretrained(root / "text_encoder", use_safetensors=True, **common)
        return TextEncoders(version, tokenizer, _frozen(t5, device), **options)
    tokenizer = transformers.BertTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    tokenizer_2 = transformers.T5Tokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
    bert = transformers.BertModel.from_pretrained(root / "text_encoder", use_safetensors=True, **common)
    mt5 = transformers.T5EncoderModel.from_pretrained(root / "text_encoder_2", use_safetensors=True, **common)
    return TextEncoders(version, tokenizer, _frozen(bert, device), tokenizer_2, _frozen(mt5, device), **options)
