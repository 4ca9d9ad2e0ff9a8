"""`easyanimate train --cache-latents --cache-inpaint N`: inpaint training with no VAE work per step."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from easyanimate_core.pipeline import encode_mean, inpaint_from_masked
from easyanimate_core.training import trainer as train_module
from easyanimate_core.training.examples import draw_inpaint_input, fixed_clip_generator, seeded
from easyanimate_core.training.trainer import run_training
from easyanimate_core.vae import MagvitVAE

from .test_train import cli_args, parse, write_dataset, write_training_checkpoint

MASKS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint_cache")
    return {"root": root, "model": write_training_checkpoint(root / "model"), "data": write_dataset(root / "data")}


@pytest.fixture(scope="module")
def cached_run(workspace):
    """A 4-step LoRA run in inpaint mode on cached latents and cached inpaint inputs, counting VAE encodes."""
    calls = {"caching": 0, "training": 0}
    phase = ["training"]
    encode = MagvitVAE.encode

    def counting_encode(self, *args, **kwargs):
        calls[phase[0]] += 1
        return encode(self, *args, **kwargs)

    runs = []

    def while_caching(build):
        def wrapped(run):
            runs.append(run)
            phase[0] = "caching"
            try:
                return build(run)
            finally:
                phase[0] = "training"

        return wrapped

    seen = []
    inpaint_batch = train_module.inpaint_batch

    def recording_inpaint_batch(run, items, shape):
        out = inpaint_batch(run, items, shape)
        seen.append(out.clone())
        return out

    cache = workspace["root"] / "cache"
    extra = ["--cache-dir", str(cache), "--cache-latents", "--cache-inpaint", str(MASKS), "--max-steps", "4"]
    extra += ["--train-mode", "inpaint", "--checkpoint-every", "4"]
    with contextlib.ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr(MagvitVAE, "encode", counting_encode)
        patch.setattr(train_module, "build_latent_cache", while_caching(train_module.build_latent_cache))
        patch.setattr(train_module, "build_inpaint_cache", while_caching(train_module.build_inpaint_cache))
        patch.setattr(train_module, "inpaint_batch", recording_inpaint_batch)
        result = run_training(parse(cli_args(workspace, workspace["root"] / "out", *extra)))
    return {"result": result, "calls": calls, "inpaint": seen, "cache": cache, "run": runs[-1]}


def test_training_steps_encode_nothing_and_see_cached_masks(cached_run):
    assert cached_run["calls"]["caching"] > 0
    assert cached_run["calls"]["training"] == 0  # every masked clip came from the cache
    losses = cached_run["result"].losses
    assert len(losses) == 4 and all(np.isfinite(v) for v in losses.values())
    kept = [batch[:, 0] for batch in cached_run["inpaint"]]  # mask latents: scaling factor where pixels are kept
    assert any(float(m.abs().sum()) > 0 for m in kept)


def test_cached_inpaint_inputs_equal_the_masks_encoded_directly(cached_run, workspace):
    """Each sample's cached rows are pipeline.inpaint_from_masked of the VAE's encoding of its seeded mask draws."""
    from easyanimate_core import load_vae
    from easyanimate_core.training.dataset import load_clip

    run = cached_run["run"]
    rows = [load_file(f) for f in sorted((cached_run["cache"] / "inpaint").glob("*.safetensors"))]
    assert len(rows) == len(run.samples) == 4  # two videos, two images
    vae = load_vae(workspace["model"])
    for sample, bucket in zip(run.samples, run.buckets, strict=True):
        pixels = load_clip(sample, bucket, run.args.stride, fixed_clip_generator(run.args.seed, sample.index))[None]
        assert sum(_matches(r, vae, pixels, sample.index, run.args.seed) for r in rows) == 1


def _matches(rows: dict, vae, pixels: torch.Tensor, index: int, seed: int) -> bool:
    """Whether ``rows`` are the inpaint inputs of ``pixels`` (sample ``index``) for every mask draw."""
    for m in range(MASKS):
        mask, masked = draw_inpaint_input(pixels, seeded(seed, -2, index, m))
        if masked is None:
            expected = torch.zeros_like(rows[f"inpaint{m}"])
        else:
            expected = inpaint_from_masked(vae, encode_mean(vae, masked, "cpu"), mask, "cpu")[0]
        if rows[f"inpaint{m}"].shape != expected.shape or (rows[f"inpaint{m}"] - expected).abs().max() > 1e-5:
            return False
    return True


def test_cache_inpaint_needs_cached_latents(workspace, capsys):
    from easyanimate_core.cli import main

    argv = cli_args(workspace, workspace["root"] / "refused", "--cache-inpaint", "2")
    assert main(argv) == 2
    assert "--cache-inpaint" in capsys.readouterr().err
