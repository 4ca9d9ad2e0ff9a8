"""Faster sampling: step caching (TeaCache) and CFG skipping, on tiny random models."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from easyanimate_core.attention import attention_backend, sdpa_attention, using_attention
from easyanimate_core.pipeline import cfg_skip_steps
from easyanimate_core.regional_compile import compile_blocks
from easyanimate_core.step_cache import (
    COEFFICIENTS_FILE,
    RELEASED_COEFFICIENTS,
    StepCache,
    model_coefficients,
    polynomial,
)
from tests.test_context import CallRecorder, run, tiny_parts


def test_polynomial_is_numpy_poly1d_order():
    coefficients = RELEASED_COEFFICIENTS[("V5.1", 48, 3072)]
    for x in (0.0, 0.03, 0.2):
        assert polynomial(coefficients, x) == pytest.approx(float(np.poly1d(coefficients)(x)))


def fake_blocks(calls: list):
    def run_blocks(x):
        calls.append(1)
        return x * 2 + 1

    return run_blocks


def test_a_skipped_call_adds_the_last_residual_and_first_and_last_steps_always_run():
    cache = StepCache([1.0], threshold=100.0)  # every estimate 1: skips until 100 of them add up
    x = torch.ones(1, 4, 8)
    calls = []
    outs = [cache.for_call("cond", i, 5)(x * (i + 1), x * (i + 1), fake_blocks(calls)) for i in range(5)]
    assert len(calls) == 2 and (cache.passes, cache.skips) == (2, 3)  # steps 0 and 4 ran
    residual = (x * 2 + 1) - x
    for i in (1, 2, 3):
        assert torch.equal(outs[i], x * (i + 1) + residual)
    assert torch.equal(outs[4], x * 5 * 2 + 1)


def test_changes_accumulate_until_the_threshold_then_the_blocks_run_again():
    cache = StepCache([1.0, 0.0], threshold=0.25)  # estimate = the input's relative change
    calls = []
    for i in range(6):  # inputs 1, 1.1, 1.2, ...: relative changes ~0.1 each
        x = torch.full((1, 2, 4), 1 + 0.1 * i)
        cache.for_call("cond", i, 6)(x, x, fake_blocks(calls))
    # step 0 runs; 0.1, 0.19 stay under 0.25 (skip); 0.27 runs; 0.08 skips; step 5 (last) runs
    assert (cache.passes, cache.skips) == (3, 3)


def test_each_branch_is_compared_with_its_own_previous_call():
    cache = StepCache([1.0, 0.0], threshold=0.05)
    calls = []
    for i in range(4):
        cond, uncond = torch.full((1, 2, 4), 1.0), torch.full((1, 2, 4), 1.0 + i)  # uncond changes, cond does not
        cache.for_call("cond", i, 4)(cond, cond, fake_blocks(calls))
        cache.for_call("uncond", i, 4)(uncond, uncond, fake_blocks(calls))
    assert cache.skips == 2  # cond skips steps 1 and 2; uncond runs every step


def test_threshold_zero_never_skips_and_equals_no_cache():
    transformer, vae = tiny_parts(4)
    plain = run(transformer, vae)
    cache = StepCache(RELEASED_COEFFICIENTS[("V5.1", 48, 3072)], threshold=0.0)
    assert torch.equal(run(transformer, vae, step_cache=cache), plain)
    assert cache.skips == 0 and cache.passes == 3


def test_a_cache_skips_middle_steps_of_a_real_run_and_stays_close():
    transformer, vae = tiny_parts(4)
    plain = run(transformer, vae)
    cache = StepCache([1.0, 0.0], threshold=1e9)
    cached = run(transformer, vae, step_cache=cache)
    assert (cache.passes, cache.skips) == (2, 1)  # 3 steps: the middle one reuses the first one's residual
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()


def test_coefficients_come_from_the_folder_else_the_released_table_else_an_error(tmp_path):
    assert model_coefficients(tmp_path, "V5.1", 36, 3072) == RELEASED_COEFFICIENTS[("V5.1", 36, 3072)]
    with pytest.raises(ValueError, match="no step-cache polynomial for this V5 model .*bench/fit_step_cache.py"):
        model_coefficients(tmp_path, "V5", 48, 3072)  # V5-12B: none published
    (tmp_path / COEFFICIENTS_FILE).write_text(json.dumps({"coefficients": [0.5, 0.1]}))
    assert model_coefficients(tmp_path / "transformer", "V5", 48, 3072) == [0.5, 0.1]
    (tmp_path / COEFFICIENTS_FILE).write_text("{}")
    with pytest.raises(ValueError, match="is not a step-cache file"):
        model_coefficients(tmp_path, "V5", 48, 3072)


def test_cfg_skip_steps_are_the_first_or_last_share():
    assert cfg_skip_steps(10, 0.25) == {8, 9}
    assert cfg_skip_steps(10, 0.25, "start") == {0, 1}
    assert cfg_skip_steps(10, 0.0) == set()
    with pytest.raises(ValueError, match="at least 0 and below 1"):
        cfg_skip_steps(10, 1.0)


def test_cfg_skipping_runs_the_conditional_branch_alone_at_the_skipped_steps():
    transformer, vae = tiny_parts(4)
    recorder = CallRecorder(transformer)
    skipped = run(transformer, vae, cfg_skip=0.34)  # 3 steps: the last one
    assert recorder.batch_sizes == [2, 2, 1]
    assert not torch.equal(skipped, run(transformer, vae))


def test_compiled_blocks_give_the_eager_output():
    """torch.compile per block (CPU inductor here) changes nothing beyond float tolerance."""
    transformer, vae = tiny_parts(4)
    eager = run(transformer, vae)
    compile_blocks(transformer)
    assert all("Optimized" in type(b).__name__ for b in transformer.transformer_blocks)
    torch.testing.assert_close(run(transformer, vae), eager, rtol=1e-4, atol=1e-5)


def test_a_missing_attention_backend_falls_back_to_sdpa_with_a_warning(caplog):
    fn, name = attention_backend("sdpa")
    assert name == "sdpa" and fn is sdpa_attention
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'; choose one of sdpa, sage, flash"):
        attention_backend("xformers")
    for backend, module in (("sage", "sageattention"), ("flash", "flash_attn")):
        if importlib.util.find_spec(module) is None:
            fn, name = attention_backend(backend)
            assert name == "sdpa" and fn is sdpa_attention
            assert f"attention: {backend} is not installed" in caplog.text


@pytest.mark.parametrize(("backend", "module"), [("sage", "sageattention"), ("flash", "flash_attn")])
def test_optional_backends_match_sdpa(backend, module):
    if importlib.util.find_spec(module) is None or not torch.cuda.is_available():
        pytest.skip(f"{module} is not installed or there is no CUDA device: {backend} runs on CUDA only")
    fn, name = attention_backend(backend)
    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert name == backend
    torch.testing.assert_close(fn(q, k, v).float(), sdpa_attention(q, k, v).float(), rtol=0.05, atol=0.05)


def test_using_attention_installs_a_backend_for_the_block_only():
    calls = []

    def counting(q, k, v):
        calls.append(q.shape)
        return sdpa_attention(q, k, v)

    transformer, vae = tiny_parts(4)
    plain = run(transformer, vae)
    with using_attention(counting):
        assert torch.equal(run(transformer, vae), plain)
    assert calls and len(calls) == 3 * 2  # 3 steps x 2 blocks (batched CFG: one call each)
    run(transformer, vae)
    assert len(calls) == 6


def test_v4_blocks_are_cached_too():
    """V4 (long skips inside the block stack): the cache skips the whole stack and equals it at threshold 0."""
    from tests.test_transformer_v4 import tiny_inputs, tiny_model

    model = tiny_model()
    inputs = tiny_inputs(model)
    with torch.no_grad():
        plain = model(**inputs)
        never = StepCache([1.0, 0.0], threshold=0.0)
        assert torch.equal(model(**inputs, step_cache=never.for_call("cond", 1, 3)), plain)
        cache = StepCache([1.0, 0.0], threshold=1e9)
        first = model(**inputs, step_cache=cache.for_call("cond", 0, 3))
        reused = model(**inputs, step_cache=cache.for_call("cond", 1, 3))
    assert (cache.passes, cache.skips) == (1, 1)
    torch.testing.assert_close(first, plain, rtol=0, atol=0)
    torch.testing.assert_close(reused, plain, rtol=1e-5, atol=1e-5)  # same input: the residual gives it back
