"""LoRAs of the official V1-V3 trainer on EasyAnimateV3Transformer3D (and its T5): names, merge arithmetic, errors.

Official rule (easyanimate/utils/lora_utils.py at f9eeabe; scripts/train_t2iv_lora.py calls create_network with
add_lora_in_attn_temporal=True): every Linear of the transformer, motion modules included (the 2x2 patch Conv2d
is not 1x1, so it gets none), is named ``lora_unet__`` + its module path with '.' -> '_'; tensors ``lora_down.weight``
[rank, in], ``lora_up.weight`` [out, rank], ``alpha``; merge_lora adds ``strength * alpha / rank * up @ down``.
With --train_text_encoder, the T5's T5LayerSelfAttention / T5LayerFF Linears get ``lora_te_`` names.
tests/data/official_v3_lora_keys.tsv.gz holds the names and shapes the official create_network gives the released
configurations (bench/official_v3_lora.py). With EASYANIMATE_OFFICIAL_V3_PATH set, the official create_network and
merge_lora run on the official class here too. Bound: merged weights within 1e-6 of the float64 expectation.
"""

from __future__ import annotations

import ast
import gzip
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import T5Config, T5EncoderModel

from easyanimate_core.lora import merge_lora, read_lora
from easyanimate_core.transformer_v3 import V1_XL, V2_XL, V3_XL_INP, EasyAnimateV3Transformer3D
from tests.test_transformer_v3 import TINY, ours_for, seeded_weights

RANK, ALPHA, STRENGTH = 4, 3.0, 0.7
OFFICIAL = os.environ.get("EASYANIMATE_OFFICIAL_V3_PATH")
OFFICIAL_KEYS = Path(__file__).resolve().parent / "data" / "official_v3_lora_keys.tsv.gz"


def official_names(model: torch.nn.Module, prefix: str = "lora_unet") -> dict[str, str]:
    """{official LoRA name: module path}, by the official rule. The transformer is itself the targeted class, so its
    own name is '' and names start ``lora_unet__``; T5's targets are its T5LayerSelfAttention / T5LayerFF blocks."""
    names = {}
    for parent, module in model.named_modules():
        if prefix == "lora_te" and type(module).__name__ not in ("T5LayerSelfAttention", "T5LayerFF"):
            continue
        for child, layer in module.named_modules():
            if type(layer).__name__ == "Linear":
                names[f"{prefix}.{parent}.{child}".replace(".", "_")] = f"{parent}.{child}".strip(".")
        if prefix == "lora_unet":
            break  # the root holds every Linear
    return names


def official_file(model: torch.nn.Module, prefix: str = "lora_unet", alpha: float | None = ALPHA, seed: int = 5):
    """An official-format LoRA state dict for ``model`` with random down / up, and {name: path}."""
    g = torch.Generator().manual_seed(seed)
    names = official_names(model, prefix)
    sd = {}
    for name, path in names.items():
        out_features, in_features = model.get_submodule(path).weight.shape
        sd[f"{name}.lora_down.weight"] = torch.randn(RANK, in_features, generator=g) * 0.1
        sd[f"{name}.lora_up.weight"] = torch.randn(out_features, RANK, generator=g) * 0.1
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd, names


def check_merged(before: dict, after: dict, sd: dict, names: dict, scale: float) -> None:
    """Every targeted weight moved by exactly scale * up @ down; every other tensor is untouched."""
    targeted = {f"{path}.weight": name for name, path in names.items()}
    for key, old in before.items():
        if key not in targeted:
            assert torch.equal(after[key], old), key
            continue
        name = targeted[key]
        up, down = sd[f"{name}.lora_up.weight"].double(), sd[f"{name}.lora_down.weight"].double()
        expected = old.double() + scale * up @ down
        assert (after[key].double() - expected).abs().max().item() <= 1e-6, key
        assert not torch.equal(after[key], old), key


# ------------------------------------------------------------------------------------------------ transformer


@pytest.mark.parametrize("variant", ["v3", "v2", "v1"])
def test_official_lora_merges_onto_every_linear(variant):
    model = ours_for(variant)
    sd, names = official_file(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = read_lora(sd, model)
    assert set(lora) == set(names.values())
    assert (
        sum(".attn_temporal." in path for path in lora) == 28 * 12
    )  # per motion module: proj_in/out, 2 x q/k/v/out, ff in/out
    merge_lora(model, lora, STRENGTH)
    check_merged(before, model.state_dict(), sd, names, STRENGTH * ALPHA / RANK)


def test_lora_without_alpha_scales_by_one():
    """The official merge_lora uses alpha / rank when the file has alpha, else 1."""
    model = ours_for("v2")
    sd, names = official_file(model, alpha=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model, read_lora(sd, model), STRENGTH)
    check_merged(before, model.state_dict(), sd, names, STRENGTH)


def test_unknown_module_is_reported_and_the_rest_applied(caplog):
    model = ours_for("v2")
    sd, names = official_file(model)
    stray = "lora_unet__transformer_blocks_0_attn3_to_q"
    sd |= {f"{stray}.lora_down.weight": torch.zeros(RANK, 32), f"{stray}.lora_up.weight": torch.zeros(32, RANK)}
    with caplog.at_level(logging.WARNING, logger="easyanimate_core.lora"):
        lora = read_lora(sd, model, name="v2.safetensors")
    assert set(lora) == set(names.values())
    assert "v2.safetensors: 1 LoRA entries match no layer of this model and are ignored" in caplog.text
    assert "transformer_blocks_0_attn3_to_q" in caplog.text


def test_lora_of_only_unknown_modules_is_refused():
    sd = {
        "lora_unet__transformer_blocks_0_attn3_to_q.lora_down.weight": torch.zeros(RANK, 32),
        "lora_unet__transformer_blocks_0_attn3_to_q.lora_up.weight": torch.zeros(32, RANK),
    }
    with pytest.raises(ValueError, match="none of its 1 LoRA layers match a layer of this model"):
        read_lora(sd, ours_for("v1"))


def test_v3_lora_on_v1_reports_the_image_projection(caplog):
    """A V3 InP LoRA carries clip_projection layers that V1 lacks: they are reported; the shared layers apply."""
    sd, names = official_file(ours_for("v3"))
    with caplog.at_level(logging.WARNING, logger="easyanimate_core.lora"):
        lora = read_lora(sd, ours_for("v1"))
    assert len(lora) == len(names) - 15  # 13 long skips (V1 has none) + 2 clip_projection Linears
    assert "15 LoRA entries match no layer" in caplog.text


def test_shape_mismatch_is_refused():
    model = ours_for("v2")
    sd, _ = official_file(model)
    sd["lora_unet__proj_out.lora_down.weight"] = torch.zeros(RANK, 7)
    with pytest.raises(ValueError, match=r"LoRA for proj_out has up \[32, 4\] and down \[4, 7\].*another model"):
        read_lora(sd, model)


def official_keys(model_id: str) -> dict[str, tuple[int, ...]]:
    with gzip.open(OFFICIAL_KEYS, "rt", encoding="utf-8") as f:
        rows = [line.split("\t") for line in f.read().splitlines()[2:]]
    return {key: ast.literal_eval(shape) for model, key, shape in rows if model == model_id}


@pytest.mark.parametrize(("model_id", "config"), [("v3_xl_inp", V3_XL_INP), ("v2_xl", V2_XL), ("v1_xl", V1_XL)])
def test_official_names_of_the_released_models_all_load(model_id, config, caplog):
    with torch.device("meta"):
        model = EasyAnimateV3Transformer3D(config)
    keys = official_keys(model_id)
    # Meta down / up (only names and shapes are read), real alphas.
    sd = {
        k: torch.tensor(1.0) if k.endswith(".alpha") else torch.empty(shape, device="meta") for k, shape in keys.items()
    }
    with caplog.at_level(logging.WARNING, logger="easyanimate_core.lora"):
        lora = read_lora(sd, model)
    assert len(lora) * 3 == len(keys) and not caplog.text
    assert set(official_names(model)) == {k.split(".")[0] for k in keys}  # the rule written here is the official one


# ------------------------------------------------------------------------------------------------ text encoder


def tiny_t5() -> T5EncoderModel:
    config = T5Config(
        vocab_size=40, d_model=32, d_kv=8, d_ff=16, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu"
    )
    torch.manual_seed(4)
    return T5EncoderModel(config).eval()


def test_text_encoder_entries_apply_to_the_t5_and_are_reported_on_the_transformer(caplog):
    t5, transformer = tiny_t5(), ours_for("v2")
    te_sd, te_names = official_file(t5, "lora_te")
    unet_sd, unet_names = official_file(transformer)
    assert "lora_te_encoder_block_0_layer_0_SelfAttention_q" in te_names and len(te_names) == 2 * (4 + 3)
    before = {k: v.clone() for k, v in t5.state_dict().items()}
    merge_lora(t5, read_lora(te_sd | unet_sd, t5, prefix="lora_te"), STRENGTH)
    check_merged(before, t5.state_dict(), te_sd, te_names, STRENGTH * ALPHA / RANK)
    with caplog.at_level(logging.WARNING, logger="easyanimate_core.lora"):
        lora = read_lora(te_sd | unet_sd, transformer, name="both.safetensors")
    assert set(lora) == set(unet_names.values())
    assert f"both.safetensors: {len(te_sd)} entries are for another part" in caplog.text
    assert "prefix='lora_te'" in caplog.text
    with pytest.raises(ValueError, match=r"no lora_te_\* entries; its .* official entries are for another part"):
        read_lora(unet_sd, t5, prefix="lora_te")
    with pytest.raises(ValueError, match="unknown LoRA prefix 'lora_text'"):
        read_lora(te_sd, t5, prefix="lora_text")


# ------------------------------------------------------------------------------------------------ official code


@pytest.mark.skipif(not OFFICIAL, reason="set EASYANIMATE_OFFICIAL_V3_PATH to an extracted f9eeabe checkout to run")
@pytest.mark.parametrize("variant", ["v3", "v2", "v1"])
def test_matches_official_create_network_and_merge_lora(variant):
    import inspect

    from bench.official_v3_lora import official_lora_utils, official_network
    from tests.test_transformer_v3 import official_class

    cls = official_class(OFFICIAL)
    lora_utils = official_lora_utils(Path(OFFICIAL))
    accepted = inspect.signature(cls.__init__).parameters

    def official_model():
        ref = cls(**{k: v for k, v in TINY[variant].items() if k in accepted}).eval()
        ref.load_state_dict(seeded_weights(ref), strict=True)
        return ref

    network = official_network(lora_utils, official_model(), RANK, ALPHA)
    g = torch.Generator().manual_seed(9)
    sd = {
        k: torch.randn(v.shape, generator=g) * 0.1 if k.endswith("weight") else v
        for k, v in network.state_dict().items()
    }
    assert set(sd) == set(official_file(ours_for(variant))[0])
    reference = official_model()
    lora_utils.merge_lora(SimpleNamespace(transformer=reference), None, STRENGTH, state_dict=sd, transformer_only=True)
    ours = ours_for(variant)
    lora = read_lora(sd, ours)
    merge_lora(ours, lora, STRENGTH)
    expected, unmerged = reference.state_dict(), official_model().state_dict()
    assert sum(not torch.equal(v, unmerged[k]) for k, v in expected.items()) == len(lora)  # every layer moved
    assert max((v - expected[k]).abs().max().item() for k, v in ours.state_dict().items()) <= 1e-6
