"""Model-patch nodes on the stand-in: EasyAnimate RIFLEx."""

from __future__ import annotations

import pytest
import torch

from easyanimate_core.context import riflex_frequency
from tests.comfy_standin import install


def load_model(nodes, tiny_folders, version="V5.1"):
    return nodes.nodes.EasyAnimateModelLoader().load(install(nodes, tiny_folders, version), "default")[0]


def call(patcher, frames: int, embeds: torch.Tensor) -> torch.Tensor:
    """One diffusion-model call with the patcher's transformer options, as ComfyUI's BaseModel makes it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, frames, 2, 4, generator=g)
    options = patcher.model_options["transformer_options"]
    return patcher.model.diffusion_model(x, torch.tensor([400.0]), embeds, transformer_options=options)


def test_riflex_changes_only_clips_longer_than_the_trained_length(nodes, tiny_folders):
    model = load_model(nodes, tiny_folders)
    patched = nodes.nodes.EasyAnimateRIFLEx().patch(model, trained_frames=9)[0]  # 3 latent frames
    assert "easyanimate_riflex_trained_frames" not in model.model_options["transformer_options"]  # a clone
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(call(patched, 3, embeds), call(model, 3, embeds))
    longer = call(patched, 6, embeds)
    assert not torch.allclose(longer, call(model, 6, embeds))
    transformer = model.model.diffusion_model.transformer
    frequency = riflex_frequency(transformer.config.attention_head_dim, 3, 6)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 6, 2, 4, generator=g)
    inpaint = torch.zeros(1, 17, 6, 2, 4)
    direct = transformer(x, torch.tensor([400.0]), embeds, inpaint_latents=inpaint, rope_temporal_frequency=frequency)
    torch.testing.assert_close(longer, direct[:, :16], rtol=0, atol=0)


def test_riflex_on_v4_or_with_a_bad_length_is_refused(nodes, tiny_folders):
    with pytest.raises(ValueError, match="V4 has none: remove the node"):
        nodes.nodes.EasyAnimateRIFLEx().patch(load_model(nodes, tiny_folders, "V4"), 49)
    with pytest.raises(ValueError, match="trained_frames 48 must be 4k \\+ 1"):
        nodes.nodes.EasyAnimateRIFLEx().patch(load_model(nodes, tiny_folders), 48)


def speed(nodes, model, step_cache=0.0, cfg_skip=0.0, at="end", compile=False):
    return nodes.nodes.EasyAnimateSpeed().patch(model, step_cache, cfg_skip, at, compile)[0]


def sampling_options(patcher, step: int, steps: int = 4) -> dict:
    """Transformer options as ComfyUI's sampler passes them at ``step`` (its sigmas say which step it is)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return {**patcher.model_options["transformer_options"], "sample_sigmas": sigmas, "sigmas": sigmas[step : step + 1]}


def test_step_cache_needs_the_models_polynomial_and_skips_middle_steps(nodes, tiny_folders):
    model = load_model(nodes, tiny_folders)
    with pytest.raises(ValueError, match="no step-cache polynomial for this V5.1 model .*bench/fit_step_cache.py"):
        speed(nodes, model, step_cache=0.1)
    folder = model.model.diffusion_model.folder
    (folder / "step_cache.json").write_text('{"coefficients": [1.0, 0.0]}')
    try:
        patched = speed(nodes, model, step_cache=1e3)
    finally:
        (folder / "step_cache.json").unlink()
    cache = patched.model_options["transformer_options"]["easyanimate_step_cache"]
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 16, 2, 2, 4, generator=torch.Generator().manual_seed(2))
    net = patched.model.diffusion_model
    outs = [
        net(x, torch.tensor([900.0 - 200 * i]), embeds, transformer_options=sampling_options(patched, i))
        for i in range(4)
    ]
    assert (cache.passes, cache.skips) == (2, 2)  # steps 0 and 3 run; 1 and 2 reuse step 0's residual
    plain = net(x, torch.tensor([700.0]), embeds, transformer_options=sampling_options(model, 1))
    assert not torch.equal(outs[1], plain) and torch.isfinite(outs[1]).all()
    assert "easyanimate_step_cache" not in model.model_options["transformer_options"]  # the input MODEL is untouched


def test_cfg_skip_runs_the_conditional_branch_alone_at_the_last_steps(nodes, tiny_folders):
    patched = speed(nodes, load_model(nodes, tiny_folders), cfg_skip=0.5)
    [[wrapper]] = patched.model_options["transformer_options"]["wrappers"]["calc_cond_batch"].values()
    seen = []

    def executor(model, conds, x_in, timestep, model_options):
        seen.append([c is not None for c in conds])
        return [torch.full_like(x_in, 1.0 + i) for i in range(len(conds))]

    options = {"transformer_options": {"sample_sigmas": torch.linspace(1.0, 0.0, 5)}}
    x = torch.zeros(1, 2)
    outs = [wrapper(executor, None, ["cond", "uncond"], x, torch.tensor([s]), options) for s in (1.0, 0.75, 0.5, 0.25)]
    assert seen == [[True, True], [True, True], [True, False], [True, False]]
    assert torch.equal(outs[0][1], torch.full_like(x, 2.0)) and torch.equal(outs[3][1], outs[3][0])


def test_compile_is_an_object_patch_per_block(nodes, tiny_folders):
    model = load_model(nodes, tiny_folders)
    patched = speed(nodes, model, compile=True)
    blocks = model.model.diffusion_model.transformer.transformer_blocks
    assert set(patched.object_patches) == {
        f"diffusion_model.transformer.transformer_blocks.{i}" for i in range(len(blocks))
    }
    assert all(type(b).__name__ != "OptimizedModule" for b in blocks)  # the loaded model stays eager
