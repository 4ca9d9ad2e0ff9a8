"""V1-V3 text encoding (T5, 120 tokens): parity with the official ``encode_prompt``, detection, file errors.

Official reference: EasyAnimatePipeline / EasyAnimateInpaintPipeline ``encode_prompt`` at f9eeabe (identical at
fb0916f, V2), run with ``clean_caption=True`` as the predict scripts do, in an environment without beautifulsoup4 /
ftfy (its fallback: ``lower().strip()``). Three references, each on a batch of two prompts with a negative prompt
and on a prompt past 120 tokens:
* the official logic written out here with transformers (always runs);
* diffusers' PixArtAlphaPipeline.encode_prompt, which the official method was adapted from (diffusers is a
  test-only dependency);
* the official method itself, cut from the pipeline file, when EASYANIMATE_OFFICIAL_V3_PATH points at an
  extracted checkout of f9eeabe (the directory holding ``easyanimate/``).
Bound: max|ours - reference| <= 1e-6 on float32 embeddings; masks equal.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece
import torch
from safetensors.torch import save_file

from easyanimate_core import text_encoders as te_module
from easyanimate_core.text_encoders import check_text_encoder_files, detect_version, load_text_encoders
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig
from tests.test_loading_v3 import write_release
from tests.tiny_text_models import write_tiny_v3_text_encoder

PROMPTS = ["A cat walks on the BEACH at sunset.  ", "the dog, static"]
NEGATIVE = "Blurry, static, low quality"  # one string for the batch, as the official pipeline takes it
LONG_PROMPT = " ".join(["a dog walks on the beach"] * 30)  # past 120 tokens for both tokenizers here
LENGTH, WIDTH = 120, 4096
OFFICIAL = os.environ.get("EASYANIMATE_OFFICIAL_V3_PATH")


@pytest.fixture(scope="module", params=["tokenizer.json", "spiece.model"])
def v3_root(request, tmp_path_factory) -> Path:
    """A V3 model root: the tiny T5 and its tokenizer (as tokenizer.json, or as released: spiece.model alone)."""
    return write_tiny_v3_text_encoder(tmp_path_factory.mktemp("v3"), spiece=request.param == "spiece.model")


@pytest.fixture(scope="module")
def v3(v3_root):
    return load_text_encoders(v3_root, "v3", cache_size=0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------ references


def written_out_reference(encoders, prompts: list[str], negative: str):
    """The official encode_prompt (pipeline_easyanimate.py:168-308 at f9eeabe), clean_caption fallback, one video
    per prompt: (embeds, mask, negative embeds, negative mask)."""
    out = []
    for texts in (prompts, [negative] * len(prompts)):
        texts = [t.lower().strip() for t in texts]  # _text_preprocessing without bs4 / ftfy
        inputs = encoders.tokenizer(
            texts, padding="max_length", max_length=120, truncation=True, add_special_tokens=True, return_tensors="pt"
        )
        with torch.no_grad():
            embeds = encoders.text_encoder(inputs.input_ids, attention_mask=inputs.attention_mask)[0]
        out += [embeds, inputs.attention_mask]
    return out


def diffusers_reference(encoders, prompts: list[str], negative: str):
    """diffusers' PixArtAlphaPipeline.encode_prompt on our tokenizer and T5 (its argument order reordered)."""
    pixart = pytest.importorskip("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha").PixArtAlphaPipeline
    pipe = SimpleNamespace(tokenizer=encoders.tokenizer, text_encoder=encoders.text_encoder, transformer=None)
    pipe._text_preprocessing = functools.partial(pixart._text_preprocessing, pipe)
    with torch.no_grad():
        embeds, mask, neg_embeds, neg_mask = pixart.encode_prompt(
            pipe, prompts, True, negative, device="cpu", clean_caption=False, max_sequence_length=120
        )
    return embeds, mask, neg_embeds, neg_mask


def official_method(filename: str, tmp_dir: Path):
    """The official pipeline's encode_prompt and _text_preprocessing, cut from the file (nothing else of it runs),
    on a class whose beautifulsoup4 / ftfy are absent."""
    source = (Path(OFFICIAL) / "easyanimate" / "pipeline" / filename).read_text()
    methods = [
        node
        for cls in ast.parse(source).body
        if isinstance(cls, ast.ClassDef)
        for node in cls.body
        if getattr(node, "name", None) in ("encode_prompt", "_text_preprocessing")
    ]
    header = (
        "import logging\nfrom typing import List, Optional, Union\n\nimport torch\n\n"
        "logger = logging.getLogger('official')\n"
        "BACKENDS_MAPPING = {'bs4': ('', '{} needs bs4'), 'ftfy': ('', '{} needs ftfy')}\n"
        "def is_bs4_available():\n    return False\n\n"
        "def is_ftfy_available():\n    return False\n\n\n"
        "class Official:\n"
    )
    body = "\n".join("    " + line for m in methods for line in ast.unparse(m).splitlines())
    module_path = tmp_dir / f"official_{Path(filename).stem}.py"
    module_path.write_text(header + body + "\n")
    spec = importlib.util.spec_from_file_location(module_path.stem, module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Official


def official_reference(encoders, prompts: list[str], negative: str, filename: str, tmp_dir: Path):
    official = official_method(filename, tmp_dir)()
    official.tokenizer, official.text_encoder, official.transformer = encoders.tokenizer, encoders.text_encoder, None
    with torch.no_grad():
        # clean_caption=True: __call__'s default, which predict_t2v.py / predict_i2v.py keep.
        embeds, mask, neg_embeds, neg_mask = official.encode_prompt(
            prompts, True, negative_prompt=negative, device="cpu", clean_caption=True, max_sequence_length=120
        )
    return embeds, mask, neg_embeds, neg_mask


# ------------------------------------------------------------------------------------------------ parity


def check_against(encoders, reference, prompts: list[str], negative: str) -> None:
    embeds, mask, neg_embeds, neg_mask = reference
    pair = encoders.encode(prompts, negative)
    assert pair.positive.embeds.shape == (len(prompts), LENGTH, WIDTH) and pair.positive.mask.shape == embeds.shape[:2]
    assert max_diff(pair.positive.embeds, embeds) <= 1e-6
    assert max_diff(pair.negative.embeds, neg_embeds) <= 1e-6
    assert torch.equal(pair.positive.mask, mask) and torch.equal(pair.negative.mask, neg_mask)


@pytest.mark.parametrize("prompts", [PROMPTS, [LONG_PROMPT, PROMPTS[1]]], ids=["batch", "long"])
@pytest.mark.parametrize("reference", [written_out_reference, diffusers_reference], ids=["written", "diffusers"])
def test_matches_official_prompt_encoding(v3, prompts, reference):
    check_against(v3, reference(v3, prompts, NEGATIVE), prompts, NEGATIVE)


@pytest.mark.skipif(not OFFICIAL, reason="set EASYANIMATE_OFFICIAL_V3_PATH to an extracted f9eeabe checkout to run")
@pytest.mark.parametrize("filename", ["pipeline_easyanimate.py", "pipeline_easyanimate_inpaint.py"])
def test_matches_official_encode_prompt(v3, filename, tmp_path):
    for prompts in (PROMPTS, [LONG_PROMPT, PROMPTS[1]]):
        check_against(v3, official_reference(v3, prompts, NEGATIVE, filename, tmp_path), prompts, NEGATIVE)


def test_masks_count_tokens_and_truncate(v3):
    pair = v3.encode([PROMPTS[0], LONG_PROMPT])
    short, long = pair.positive.mask
    n = len(v3.tokenizer(PROMPTS[0].lower().strip()).input_ids)  # words + </s>
    assert 2 < n < LENGTH and short[:n].all() and not short[n:].any()
    assert long.all()
    assert pair.negative.mask.sum(1).tolist() == [1, 1]  # the default negative "" is </s> alone


def test_spiece_tokenizer_matches_sentencepiece(tmp_path):
    """The released tokenizer (spiece.model alone), as transformers converts it, gives sentencepiece's own ids plus
    </s> (what the slow T5Tokenizer of transformers 4.37, the official pin, produced), truncated to 119 + </s>."""
    root = write_tiny_v3_text_encoder(tmp_path, spiece=True)
    encoders = load_text_encoders(root, "v3", cache_size=0)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(root / "tokenizer" / "spiece.model"))
    texts = [PROMPTS[0].lower().strip(), LONG_PROMPT]
    ids = [(processor.encode(text) + [1])[:119] for text in texts]
    ids = [row + [1] if row[-1] != 1 else row for row in ids]  # truncation keeps </s> last
    padded = torch.tensor([row + [0] * (LENGTH - len(row)) for row in ids])
    mask = (torch.arange(LENGTH) < torch.tensor([len(row) for row in ids])[:, None]).long()
    with torch.no_grad():
        expected = encoders.text_encoder(padded, attention_mask=mask)[0]
    positive = encoders.encode([PROMPTS[0], LONG_PROMPT]).positive
    assert len(ids[1]) == LENGTH and torch.equal(positive.mask, mask)
    assert max_diff(positive.embeds, expected) <= 1e-6


def test_cased_prompts_encode_alike(v3):
    """The official fallback lower-cases and strips: these differ only in case and surrounding spaces."""
    a, b = v3.encode_texts(["A Cat walks", "  a cat WALKS\n"]).embeds
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("transformer", ["V1", "V2", "V3"])
def test_detected_from_the_transformer(tmp_path, transformer):
    root, _ = write_release(tmp_path, transformer)
    write_tiny_v3_text_encoder(root)
    assert detect_version(root) == "v3"
    assert load_text_encoders(root).version == "v3"


@pytest.mark.parametrize("name", ["V1", "v2", "3", "V3"])
def test_v1_and_v2_are_the_v3_kind(v3_root, name):
    assert load_text_encoders(v3_root, name, cache_size=0).version == "v3"


def test_t5_beside_a_v5_transformer_is_refused(tmp_path):
    config = TransformerConfig(
        num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, num_layers=2, mmdit_layers=1,
        time_embed_dim=8, text_embed_dim=32, text_embed_dim_t5=32, add_norm_text_encoder=False,
    )  # fmt: skip
    (tmp_path / "transformer").mkdir()
    state_dict = {k: v.contiguous() for k, v in EasyAnimateTransformer3D(config).state_dict().items()}
    save_file(state_dict, tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    write_tiny_v3_text_encoder(tmp_path)
    with pytest.raises(ValueError, match=r"text_encoder is T5 \(EasyAnimate V1-V3\), but transformer/ holds a V5"):
        detect_version(tmp_path)


def test_t5_without_a_transformer_asks_for_the_version(v3_root):
    with pytest.raises(ValueError, match=r"could not be read to tell the version .*pass version='v3'"):
        detect_version(v3_root)


# ------------------------------------------------------------------------------------------------ file errors


def copy_root(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "ckpt"))


def test_missing_files_listed(tmp_path):
    with pytest.raises(ValueError) as error:
        check_text_encoder_files(tmp_path, "v3")
    message = str(error.value)
    for name in ("text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json"):
        assert name in message
    assert "tokenizer/spiece.model (or tokenizer.json)" in message and "text_encoder_2" not in message
    assert "download the full model folder" in message


def test_missing_spiece_model_named(v3_root, tmp_path):
    root = copy_root(v3_root, tmp_path)
    for name in ("spiece.model", "tokenizer.json"):
        (root / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"^tokenizer/spiece.model \(or tokenizer.json\) missing under"):
        load_text_encoders(root, "v3")


def test_pickle_only_weights_refused(v3_root, tmp_path):
    root = copy_root(v3_root, tmp_path)
    (root / "text_encoder" / "model.safetensors").unlink()
    (root / "text_encoder" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"text_encoder/pytorch_model.bin .*arbitrary code.*safe_serialization=True"):
        load_text_encoders(root, "v3")


def test_spiece_needs_sentencepiece(tmp_path, monkeypatch):
    root = write_tiny_v3_text_encoder(tmp_path, spiece=True)
    monkeypatch.setattr(te_module, "_importable", lambda name: name != "google.protobuf")
    with pytest.raises(ValueError, match=r"/tokenizer holds only spiece.model.*Missing: google.protobuf$"):
        load_text_encoders(root, "v3")


def test_version_must_match_text_encoder(v3_root, tmp_path):
    root = copy_root(v3_root, tmp_path)
    config = json.loads((root / "text_encoder" / "config.json").read_text())
    (root / "text_encoder" / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    with pytest.raises(ValueError, match="text_encoder is 'bert', but v3 uses t5"):
        load_text_encoders(root, "v3")
