"""Text encoders: V5.1 parity with diffusers' EasyAnimatePipeline.encode_prompt, V4/V5 mask use, errors.

Tiny random models and tokenizers are built offline (tests/tiny_text_models.py). The optional official-code
parity runs the official ``encode_prompt`` (extracted from the pipeline file, not imported) when
``EASYANIMATE_OFFICIAL_PATH`` points at an extracted aigc-apps/EasyAnimate checkout.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from easyanimate_core import text_encoders as te_module
from easyanimate_core.text_encoders import load_text_encoders
from tests.tiny_text_models import write_tiny_v5_text_encoders, write_tiny_v51_text_encoder

PROMPTS = ["a cat walks on the beach at sunset", "一只猫 a dog, static"]
NEGATIVES = ["blurry, static, 低质量", ""]
LONG_PROMPT = " ".join(["a dog walks on the beach"] * 60)  # past 256 tokens for every tokenizer here


@pytest.fixture(scope="module")
def v51_root(tmp_path_factory) -> Path:
    return write_tiny_v51_text_encoder(tmp_path_factory.mktemp("v51"))


@pytest.fixture(scope="module")
def v5_root(tmp_path_factory) -> Path:
    return write_tiny_v5_text_encoders(tmp_path_factory.mktemp("v5"))


@pytest.fixture(scope="module")
def v51(v51_root):
    return load_text_encoders(v51_root)


@pytest.fixture(scope="module", params=["v4", "v5"])
def bert_t5(request, v5_root):
    return load_text_encoders(v5_root, request.param)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------- V5.1


def test_v51_detected_and_text_only(v51, v51_root):
    full = load_text_encoders(v51_root, text_only=False)
    assert v51.version == "v5.1"
    assert not hasattr(v51.text_encoder.model, "visual") and not hasattr(v51.text_encoder, "lm_head")
    assert hasattr(full.text_encoder.model, "visual")
    ours, theirs = v51.encode(PROMPTS, NEGATIVES), full.encode(PROMPTS, NEGATIVES)
    assert torch.equal(ours.positive.embeds, theirs.positive.embeds)


@pytest.mark.parametrize("prompts,negatives", [(PROMPTS, NEGATIVES), ([LONG_PROMPT], [""]), ("一只猫", "低质量")])
def test_v51_matches_diffusers_encode_prompt(v51_root, prompts, negatives):
    pipeline_module = pytest.importorskip("diffusers.pipelines.easyanimate.pipeline_easyanimate")
    ours = load_text_encoders(v51_root)
    full = load_text_encoders(v51_root, text_only=False)  # diffusers runs the whole Qwen2VLForConditionalGeneration
    # encode_prompt reads only these three attributes of the pipeline.
    pipe = SimpleNamespace(text_encoder=full.text_encoder, tokenizer=full.tokenizer, enable_text_attention_mask=True)
    embeds, neg_embeds, mask, neg_mask = pipeline_module.EasyAnimatePipeline.encode_prompt(
        pipe, prompts, negative_prompt=negatives
    )
    pair = ours.encode(prompts, negatives)
    batch = 1 if isinstance(prompts, str) else len(prompts)
    assert pair.positive.embeds.shape == (batch, 256, 32) and pair.positive.mask.shape == (batch, 256)
    assert max_diff(pair.positive.embeds, embeds) <= 1e-6
    assert max_diff(pair.negative.embeds, neg_embeds) <= 1e-6
    assert torch.equal(pair.positive.mask, mask) and torch.equal(pair.negative.mask, neg_mask)


def test_v51_right_padding_and_truncation(v51):
    short, long = v51.encode([PROMPTS[0], LONG_PROMPT]).positive.mask
    n = int(short.sum())
    assert 0 < n < 256 and short[:n].all() and not short[n:].any()
    assert long.all()


# ----------------------------------------------------------------------------------------------- V4 / V5


def tokenized(tokenizer, texts, length):
    inputs = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return inputs.input_ids, inputs.attention_mask


def test_bert_t5_shapes_and_masks(bert_t5):
    pair = bert_t5.encode(PROMPTS)
    for part in pair:
        assert part.embeds.shape == (2, 77, 32) and part.mask.shape == (2, 77)
        assert part.embeds_2.shape == (2, 256, 32) and part.mask_2.shape == (2, 256)
    assert torch.equal(pair.positive.mask, tokenized(bert_t5.tokenizer, PROMPTS, 77)[1])
    assert torch.equal(pair.positive.mask_2, tokenized(bert_t5.tokenizer_2, PROMPTS, 256)[1])
    assert torch.equal(pair.negative.mask, tokenized(bert_t5.tokenizer, ["", ""], 77)[1])


@pytest.mark.parametrize("stream", ["bert", "mt5"])
def test_v4_runs_with_masks_and_v5_without(bert_t5, stream):
    tokenizer, encoder, length = (
        (bert_t5.tokenizer, bert_t5.text_encoder, 77)
        if stream == "bert"
        else (bert_t5.tokenizer_2, bert_t5.text_encoder_2, 256)
    )
    ids, mask = tokenized(tokenizer, PROMPTS, length)
    with torch.no_grad():
        masked, unmasked = encoder(ids, attention_mask=mask)[0], encoder(ids)[0]
    assert max_diff(masked, unmasked) > 1e-3  # the padding mask does change these encoders' outputs
    positive = bert_t5.encode(PROMPTS).positive
    ours = positive.embeds if stream == "bert" else positive.embeds_2
    expected = masked if bert_t5.version == "v4" else unmasked
    assert max_diff(ours, expected) <= 1e-6


def test_bert_t5_truncation(bert_t5):
    positive = bert_t5.encode([LONG_PROMPT]).positive
    assert positive.mask.all() and positive.mask_2.all()


# ----------------------------------------------------------------------------------------------- API


def test_negative_prompt_defaults_to_empty_and_broadcasts(v51):
    default = v51.encode(PROMPTS).negative
    assert torch.equal(default.embeds, v51.encode(PROMPTS, "").negative.embeds)
    assert torch.equal(default.embeds[0], v51.encode_texts([""]).embeds[0])
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        v51.encode(PROMPTS, ["x"])


def test_cache_reuses_encodings_and_evicts_oldest(v51_root, monkeypatch):
    encoders = load_text_encoders(v51_root, cache_size=2)
    batches = []
    encode_batch = encoders._encode_batch
    monkeypatch.setattr(encoders, "_encode_batch", lambda texts: batches.append(texts) or encode_batch(texts))
    first = encoders.encode_texts(PROMPTS)
    again = encoders.encode_texts(PROMPTS[::-1])
    assert batches == [PROMPTS]
    assert torch.equal(again.embeds, first.embeds.flip(0)) and torch.equal(again.mask, first.mask.flip(0))
    encoders.encode_texts(["a cat"])  # evicts the least recently used entry (PROMPTS[1] was used first)
    encoders.encode_texts(PROMPTS[:1])
    encoders.encode_texts(PROMPTS[1:])
    assert batches == [PROMPTS, ["a cat"], PROMPTS[1:]]
    encoders.clear_cache()
    encoders.encode_texts(PROMPTS[:1])
    assert batches[-1] == PROMPTS[:1]


def test_cache_disabled(v51_root, monkeypatch):
    encoders = load_text_encoders(v51_root, cache_size=0)
    calls = []
    encode_batch = encoders._encode_batch
    monkeypatch.setattr(encoders, "_encode_batch", lambda texts: calls.append(texts) or encode_batch(texts))
    encoders.encode_texts(["a cat"])
    encoders.encode_texts(["a cat"])
    assert calls == [["a cat"], ["a cat"]]


def test_prompt_embeds_helpers(bert_t5):
    pair = bert_t5.encode(PROMPTS, NEGATIVES)
    cfg = pair.for_cfg()
    assert torch.equal(cfg.embeds_2[:2], pair.negative.embeds_2) and torch.equal(cfg.mask[2:], pair.positive.mask)
    repeated = pair.positive.repeat_interleave(3)
    assert repeated.batch_size == 6 and torch.equal(repeated.embeds[3], pair.positive.embeds[1])
    half = pair.positive.to(dtype=torch.float16)
    assert half.embeds.dtype == half.embeds_2.dtype == torch.float16 and half.mask.dtype == pair.positive.mask.dtype


def test_offload_keeps_encoding(v51_root):
    encoders = load_text_encoders(v51_root, dtype=torch.bfloat16, cache_size=0)
    assert encoders.dtype == torch.bfloat16
    before = encoders.encode_texts(["a cat"])
    assert encoders.offload() is encoders and encoders.device == torch.device("cpu")
    after = encoders.to("cpu").encode_texts(["a cat"])
    assert before.embeds.dtype == torch.bfloat16 and torch.equal(before.embeds, after.embeds)


# ----------------------------------------------------------------------------------------------- errors


def copy_root(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "ckpt"))


def test_missing_folders_listed(tmp_path):
    with pytest.raises(ValueError) as error:
        load_text_encoders(tmp_path, "v5")
    message = str(error.value)
    for name in [
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.txt (or tokenizer.json)",
        "tokenizer_2/spiece.model (or tokenizer.json)",
    ]:
        assert name in message
    assert str(tmp_path) in message and "download the full model folder" in message


def test_missing_files_listed_exactly(v51_root, tmp_path):
    root = copy_root(v51_root, tmp_path)
    (root / "tokenizer" / "tokenizer_config.json").unlink()
    (root / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ValueError) as error:
        load_text_encoders(root, "v5.1")
    assert str(error.value).startswith("text_encoder/model.safetensors, tokenizer/tokenizer_config.json missing")


def test_missing_chat_template(v51_root, tmp_path):
    root = copy_root(v51_root, tmp_path)
    (root / "tokenizer" / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="tokenizer/chat_template.jinja"):
        load_text_encoders(root)


def test_missing_shard_listed(v5_root, tmp_path):
    root = copy_root(v5_root, tmp_path)
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (root / "text_encoder_2" / "model.safetensors").rename(root / "text_encoder_2" / "model-00001-of-00002.safetensors")
    index["weight_map"]["b"] = "model-00002-of-00002.safetensors"
    (root / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"^text_encoder_2/model-00002-of-00002.safetensors missing"):
        load_text_encoders(root, "v4")


def test_pickle_weights_refused(v5_root, tmp_path):
    root = copy_root(v5_root, tmp_path)
    (root / "text_encoder" / "model.safetensors").unlink()
    (root / "text_encoder" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="text_encoder/pytorch_model.bin.*arbitrary code"):
        load_text_encoders(root, "v5")


def test_sentencepiece_needed_for_spiece_model(v5_root, tmp_path, monkeypatch):
    root = copy_root(v5_root, tmp_path)
    (root / "tokenizer_2" / "tokenizer.json").unlink()
    (root / "tokenizer_2" / "spiece.model").write_bytes(b"not read")
    monkeypatch.setattr(te_module, "_importable", lambda name: name != "sentencepiece")
    with pytest.raises(ValueError, match="sentencepiece and protobuf.*Missing: sentencepiece$"):
        load_text_encoders(root, "v5")


@pytest.mark.parametrize("version", ["v6", "4.5", "sdxl"])
def test_unknown_version(v5_root, version):
    with pytest.raises(ValueError, match="unknown EasyAnimate version"):
        load_text_encoders(v5_root, version)


def test_bert_layout_needs_explicit_version(v5_root):
    with pytest.raises(ValueError, match="version='v4' or version='v5'"):
        load_text_encoders(v5_root)


def test_version_must_match_text_encoder(v5_root, tmp_path):
    root = copy_root(v5_root, tmp_path)
    (root / "tokenizer" / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(ValueError, match="text_encoder is 'bert', but v5.1 uses qwen2_vl"):
        load_text_encoders(root, "v5.1")


# ----------------------------------------------------------------------------------------------- official


OFFICIAL = os.environ.get("EASYANIMATE_OFFICIAL_PATH")


def official_encode_prompt(filename: str, tmp_dir: Path):
    """The official pipeline's ``encode_prompt`` on its own: its source, cut from the file, imported as a module
    with just the names it uses (the rest of the official file, and its imports, never run)."""
    source = (Path(OFFICIAL) / "easyanimate" / "pipeline" / filename).read_text()
    tree = ast.parse(source)
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    function = next(node for cls in classes for node in cls.body if getattr(node, "name", None) == "encode_prompt")
    header = (
        "import logging\nfrom typing import List, Optional, Union\n\nimport torch\n"
        "from transformers import BertTokenizer, T5Tokenizer\n\nlogger = logging.getLogger('official')\n\n\n"
    )
    module_path = tmp_dir / f"official_{Path(filename).stem}.py"
    module_path.write_text(header + ast.unparse(function) + "\n")
    spec = importlib.util.spec_from_file_location(module_path.stem, module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.encode_prompt


@pytest.mark.skipif(not OFFICIAL, reason="set EASYANIMATE_OFFICIAL_PATH to an extracted official checkout to run")
@pytest.mark.parametrize("filename", ["pipeline_easyanimate.py", "pipeline_easyanimate_inpaint.py"])
@pytest.mark.parametrize("version", ["v4", "v5", "v5.1"])
def test_matches_official_encode_prompt(v5_root, v51_root, filename, version, tmp_path):
    encode_prompt = official_encode_prompt(filename, tmp_path)
    ours = load_text_encoders(v51_root if version == "v5.1" else v5_root, version, cache_size=0)
    official = SimpleNamespace(
        tokenizer=ours.tokenizer,
        text_encoder=load_text_encoders(v51_root, text_only=False).text_encoder
        if version == "v5.1"
        else ours.text_encoder,
        tokenizer_2=ours.tokenizer_2,
        text_encoder_2=ours.text_encoder_2,
        transformer=SimpleNamespace(config=SimpleNamespace(enable_text_attention_mask=version != "v5")),
    )
    # The official V5.1 path renders a list of prompts as ONE multi-turn chat, so it is used with one prompt.
    prompt, negative = PROMPTS[1], NEGATIVES[0]
    pair = ours.encode(prompt, negative)
    streams = [("embeds", "mask", 0)] + ([] if version == "v5.1" else [("embeds_2", "mask_2", 1)])
    for embeds_name, mask_name, index in streams:
        embeds, neg_embeds, mask, neg_mask = encode_prompt(
            official, prompt, "cpu", torch.float32, negative_prompt=negative, text_encoder_index=index
        )
        assert max_diff(getattr(pair.positive, embeds_name), embeds) <= 1e-6
        assert max_diff(getattr(pair.negative, embeds_name), neg_embeds) <= 1e-6
        assert torch.equal(getattr(pair.positive, mask_name), mask)
        assert torch.equal(getattr(pair.negative, mask_name), neg_mask)
