"""EasyAnimate Multi-GPU on the stand-in: the MODEL's calls run on 2 CPU worker processes and equal one process."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.test_model_patch_nodes import load_model


@pytest.fixture
def multi_gpu(nodes):
    module = sys.modules[f"{nodes.package.__name__}.multi_gpu"]
    yield module
    module.close_pools()


def patch(nodes, model, ulysses=2, ring=1, cfg=False, devices="cpu"):
    return nodes.nodes.EasyAnimateMultiGPU().patch(model, ulysses, ring, cfg, devices)[0]


@pytest.mark.parametrize("settings", [{"ulysses": 2}, {"ulysses": 1, "cfg": True}], ids=["ulysses2", "cfg2"])
def test_the_patched_model_predicts_what_one_process_does(nodes, tiny_folders, multi_gpu, settings):
    model = load_model(nodes, tiny_folders)
    parallel = patch(nodes, model, **settings)
    assert "easyanimate_parallel" not in model.model_options["transformer_options"]  # a clone
    embeds = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 16, 2, 2, 4, generator=torch.Generator().manual_seed(2))
    one = model.model.diffusion_model(x, torch.tensor([400.0, 400.0]), embeds, transformer_options={})
    options = parallel.model_options["transformer_options"]
    two = parallel.model.diffusion_model(x, torch.tensor([400.0, 400.0]), embeds, transformer_options=options)
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)
    [pool] = multi_gpu._pools.values()
    loaded = pool.weights_key
    parallel.model.diffusion_model(x, torch.tensor([400.0, 400.0]), embeds, transformer_options=options)
    assert multi_gpu._pools == {next(iter(multi_gpu._pools)): pool} and pool.weights_key is loaded  # reused


def test_weights_are_sent_as_the_layers_compute_with_them(nodes, tiny_folders, multi_gpu):
    """A LoRA in ComfyUI's lowvram mode is a layer's weight_function, not a change of the weight."""
    transformer = load_model(nodes, tiny_folders).model.diffusion_model.transformer
    before = multi_gpu.weights_key(transformer)
    layer = transformer.transformer_blocks[0].attn1.to_q
    layer.weight_function = [lambda w: w * 2]
    weights = multi_gpu.patched_weights(transformer)
    torch.testing.assert_close(weights["transformer_blocks.0.attn1.to_q.weight"], layer.weight * 2)
    torch.testing.assert_close(
        weights["transformer_blocks.0.attn1.to_k.weight"],
        transformer.state_dict()["transformer_blocks.0.attn1.to_k.weight"],
    )
    assert multi_gpu.weights_key(transformer) != before
    layer.weight_function = []
    with torch.no_grad():
        layer.weight.mul_(1.5)  # patched in place, as a full load patches a LoRA in
    assert multi_gpu.weights_key(transformer) != before


def test_bad_settings_are_refused_before_sampling(nodes, tiny_folders, multi_gpu, monkeypatch):
    model = load_model(nodes, tiny_folders)
    with pytest.raises(ValueError, match="Ulysses degree 4 does not divide the model's 2 attention heads"):
        patch(nodes, model, ulysses=4, devices="cpu")
    with pytest.raises(ValueError, match="devices lists 1 .* but the degrees need 2"):
        patch(nodes, model, devices="cpu:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="the degrees need 2 GPUs but 0 were found; .* set devices to cpu"):
        patch(nodes, model, devices="auto")
    with pytest.raises(ValueError, match="runs V5 / V5.1 models; this is a V4 MODEL"):
        patch(nodes, load_model(nodes, tiny_folders, "V4"))
    assert not multi_gpu._pools  # nothing was started


def test_the_step_cache_is_refused_at_the_first_call(nodes, tiny_folders, multi_gpu):
    model = load_model(nodes, tiny_folders)
    parallel = patch(nodes, model)
    options = {**parallel.model_options["transformer_options"], "easyanimate_step_cache": _Cache()}
    with pytest.raises(ValueError, match="runs without the step cache"):
        call_with(parallel, options)


class _Cache:
    def for_call(self, *args):
        return lambda signal, x, run_blocks: run_blocks(x)


def call_with(patcher, options):
    x = torch.randn(1, 16, 2, 2, 4)
    return patcher.model.diffusion_model(x, torch.tensor([400.0]), torch.randn(1, 7, 32), transformer_options=options)
