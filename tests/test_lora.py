"""LoRA reading in every layout, merging, stacking and the errors for files that are not LoRAs for this model."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from easyanimate_core.keys import official_to_diffusers
from easyanimate_core.lora import (
    LoraLayer,
    LoraNetwork,
    UnmergedLora,
    merge_lora,
    read_lora,
    save_lora,
    unmerge_lora,
)
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig

CFG = TransformerConfig(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    mmdit_layers=1,
    time_embed_dim=8,
    text_embed_dim=12,
    add_norm_text_encoder=True,
)
RANK = 4


@pytest.fixture
def model():
    torch.manual_seed(0)
    return EasyAnimateTransformer3D(CFG).eval()


def linear_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.fixture
def tensors(model):
    """down/up per Linear layer (official module paths), as a trainer would produce them."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for path in linear_paths(model):
        weight = model.get_submodule(path).weight
        out[path] = (torch.randn(RANK, weight.shape[1], generator=g), torch.randn(weight.shape[0], RANK, generator=g))
    return out


def official_file(tensors, alpha=float(RANK)) -> dict:
    sd = {}
    for path, (down, up) in tensors.items():
        name = "lora_unet__" + path.replace(".", "_")
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    return sd


def peft_file(tensors) -> dict:
    return {
        f"base_model.model.{path}.{part}.weight": t
        for path, (down, up) in tensors.items()
        for part, t in (("lora_A", down), ("lora_B", up))
    }


def diffusers_file(tensors) -> dict:
    return {
        f"transformer.{official_to_diffusers(path + '.weight')[: -len('.weight')]}.{part}.weight": t
        for path, (down, up) in tensors.items()
        for part, t in (("lora_A", down), ("lora_B", up))
    }


def merged_weights(model, lora, strength=1.0) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model, lora, strength)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return merged


def test_official_peft_and_diffusers_layouts_give_the_same_patched_weights(model, tensors, tmp_path):
    results = []
    for name, sd in (
        ("official", official_file(tensors)),
        ("peft", peft_file(tensors)),
        ("diffusers", diffusers_file(tensors)),
    ):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        lora = read_lora(path, model)
        assert set(lora) == set(tensors), name
        results.append(merged_weights(model, lora))
    assert any(".attn2." in p for p in tensors)  # the renamed dual-stream text attention is covered
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])
    changed = [k for k, v in results[0].items() if not torch.equal(v, model.state_dict()[k])]
    assert len(changed) == len(tensors)


def test_alpha_scales_the_update_and_strength_multiplies_it(model, tensors):
    path = "transformer_blocks.0.attn1.to_q"
    base = model.get_submodule(path).weight.clone()
    full = merged_weights(model, read_lora(official_file(tensors, alpha=RANK), model))[path + ".weight"] - base
    half = merged_weights(model, read_lora(official_file(tensors, alpha=RANK / 2), model))[path + ".weight"] - base
    torch.testing.assert_close(half, full / 2)
    quarter = merged_weights(model, read_lora(official_file(tensors, alpha=RANK / 2), model), 0.5)
    torch.testing.assert_close(quarter[path + ".weight"] - base, full / 4)


def test_merge_changes_the_output_and_unmerge_restores_it(model, tensors):
    x, t, text = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 12)
    with torch.no_grad():
        before = model(x, t, text)
        lora = read_lora(official_file(tensors), model)
        merge_lora(model, lora, 0.01)
        during = model(x, t, text)
        unmerge_lora(model, lora, 0.01)
        after = model(x, t, text)
    assert (during - before).abs().max() > 1e-3
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_two_loras_stack(model, tensors):
    a = read_lora(official_file(tensors), model)
    b = read_lora(peft_file({p: (2 * d, u) for p, (d, u) in tensors.items()}), model)
    path = "transformer_blocks.1.ff.net.2"
    base = model.get_submodule(path).weight.clone()
    merge_lora(model, a)
    merge_lora(model, b)
    torch.testing.assert_close(model.get_submodule(path).weight - base, a[path].delta() + b[path].delta())
    torch.testing.assert_close(b[path].delta(), 2 * a[path].delta())


def test_a_full_checkpoint_is_refused(model):
    with pytest.raises(ValueError, match="full model checkpoint .* not a LoRA; load it with the model loader"):
        read_lora(dict(model.state_dict()), model)


def test_a_lora_for_another_model_is_refused(model):
    sd = {"lora_unet__blocks_0_attn_clip_to_k.lora_down.weight": torch.zeros(2, 3)}
    sd["lora_unet__blocks_0_attn_clip_to_k.lora_up.weight"] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="none of its 1 LoRA layers match a layer of this model"):
        read_lora(sd, model)


def test_a_partial_match_warns_with_count_and_examples(model, tensors, caplog):
    sd = official_file(tensors)
    sd["lora_unet__blocks_0_skip_linear.lora_down.weight"] = torch.zeros(2, 3)
    sd["lora_unet__blocks_0_skip_linear.lora_up.weight"] = torch.zeros(3, 2)
    with caplog.at_level(logging.WARNING):
        lora = read_lora(sd, model)
    assert len(lora) == len(tensors)
    assert "1 LoRA entries match no layer" in caplog.text and "blocks_0_skip_linear" in caplog.text


def test_wrong_shapes_name_the_layer(model, tensors):
    sd = official_file(tensors)
    sd["lora_unet__proj_out.lora_up.weight"] = torch.zeros(7, RANK)
    with pytest.raises(ValueError, match="LoRA for proj_out has up \\[7, 4\\]"):
        read_lora(sd, model)


def test_pickle_files_are_refused(model, tmp_path):
    with pytest.raises(ValueError, match="safetensors files only"):
        read_lora(tmp_path / "lora.pt", model)


def test_unmerged_hooks_equal_merged_weights_and_come_off(model, tensors):
    x, t, text = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 12)
    lora = read_lora(official_file(tensors, alpha=RANK / 2), model)
    with torch.no_grad():
        before = model(x, t, text)
        hooks = UnmergedLora(model, lora, 0.02)
        unmerged = model(x, t, text)
        hooks.remove()
        assert torch.equal(model(x, t, text), before)
        merge_lora(model, lora, 0.02)
        merged = model(x, t, text)
    assert (merged - before).abs().max() > 1e-3
    torch.testing.assert_close(unmerged, merged, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Writing and training layers
# --------------------------------------------------------------------------------------------------


def official_resolver(model, layer_name: str):
    """The module the official ``lora_utils.merge_lora`` patches for a key prefix (its greedy attribute walk)."""
    infos = layer_name.split("lora_unet_")[-1].split("_")
    try:
        return model.__getattr__("_".join(infos[1:]))
    except AttributeError:
        pass
    current, name = model, infos.pop(0)
    while True:
        try:
            current = current.__getattr__(name)
            if not infos:
                return current
            name = infos.pop(0)
        except AttributeError:
            name = name + "_" + infos.pop(0) if name else infos.pop(0)


def test_written_layouts_patch_alike_and_read_back(model, tensors, tmp_path):
    """One set of tensors (alpha != rank) written as official, peft and diffusers files gives the same weights."""
    layers = {p: LoraLayer(d, u, alpha=RANK / 2) for p, (d, u) in tensors.items()}
    expected = merged_weights(model, layers)
    for layout in ("official", "peft", "diffusers"):
        path = save_lora(tmp_path / f"{layout}.safetensors", layers, layout=layout, metadata={"ss_network_dim": RANK})
        lora = read_lora(path, model)
        assert set(lora) == set(tensors), layout
        got = merged_weights(model, lora)
        assert max((got[k] - expected[k]).abs().max().item() for k in expected) < 1e-6, layout
    assert any(".attn2." in p for p in tensors)  # diffusers renames these: the layout really differs


def test_official_file_matches_the_official_loader(model, tmp_path):
    """Only lora_down / lora_up / alpha triplets (the official merge splits every key), each resolving through
    the official greedy attribute walk to the layer it was trained on; metadata and addnet hashes stored."""
    network = LoraNetwork(model, rank=RANK, alpha=2.0)
    path = save_lora(tmp_path / "lora.safetensors", network.layers(), metadata={"ss_network_alpha": 2.0})
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(network.state_dict())  # the network's own state dict is the file
    groups = {}
    for key in keys:
        layer, elem = key.split(".", 1)
        groups.setdefault(layer, set()).add(elem)
    assert all(elems == {"lora_down.weight", "lora_up.weight", "alpha"} for elems in groups.values())
    by_name = {name: path for path, name in network.paths.items()}
    assert len(by_name) == len(linear_paths(model))
    for name, module_path in by_name.items():
        assert official_resolver(model, name) is model.get_submodule(module_path), name
    assert meta["ss_network_alpha"] == "2.0" and len(meta["sshs_model_hash"]) == 64 and meta["sshs_legacy_hash"]


def test_training_network_hooks_equal_its_merged_layers(model):
    """Zero-initialised up: no change at first; after an update, hooks equal merging ``layers()``."""
    x, t, text = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 12)
    network = LoraNetwork(model, rank=RANK, alpha=2.0, targets=["transformer_blocks.*"], generator=torch.Generator())
    assert network.paths and all(p.startswith("transformer_blocks.") for p in network.paths)
    with torch.no_grad():
        before = model(x, t, text)
        network.attach(model)
        assert torch.equal(model(x, t, text), before)
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        hooked = model(x, t, text)
        network.detach()
        assert torch.equal(model(x, t, text), before)
        merge_lora(model, network.layers())
        merged = model(x, t, text)
    assert (merged - before).abs().max() > 1e-3
    torch.testing.assert_close(hooked, merged, atol=1e-5, rtol=1e-4)


def test_targets_that_match_nothing_are_refused(model):
    with pytest.raises(ValueError, match="match no Linear layer"):
        LoraNetwork(model, rank=2, targets=["*nothing*"])
