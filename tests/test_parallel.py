"""Parallel generation on several processes (gloo on the CPU): the same latents as one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from easyanimate_core.context import ContextWindows
from easyanimate_core.parallel import ParallelLayout
from easyanimate_core.parallel.workers import free_port
from easyanimate_core.pipeline import generate
from easyanimate_core.sampling import make_sampler
from easyanimate_core.step_cache import StepCache
from easyanimate_core.text_encoders import PromptEmbeds, PromptPair
from easyanimate_core.transformer import VARIANT_IN_CHANNELS, EasyAnimateTransformer3D, TransformerConfig
from easyanimate_core.vae import MagvitVAE, VAEConfig
from tests import parallel_ranks

TEXT_WIDTH = 24
VAE_CONFIG = dict(latent_channels=16, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)
FRAMES, HEIGHT, WIDTH = 9, 32, 64  # 3 latent frames x 2 x 4 tokens = 24 video tokens


def run_ranks(target, world: int, *args) -> list[dict]:
    """Run ``target(rank, world, port, out, *args)`` on ``world`` processes; each rank's saved tensors."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(target, args=(world, free_port(), out, *args), nprocs=world, join=True)
        return [load_file(str(Path(out) / f"rank{r}.safetensors")) for r in range(world)]


def tiny_parts(variant: str) -> tuple[EasyAnimateTransformer3D, MagvitVAE]:
    torch.manual_seed(0)
    config = TransformerConfig(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=VARIANT_IN_CHANNELS["V5.1"][variant],
        out_channels=16,
        num_layers=2,
        mmdit_layers=1,  # a dual-stream and a single-stream block
        time_embed_dim=8,
        text_embed_dim=TEXT_WIDTH,
    )
    transformer = EasyAnimateTransformer3D(config)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return transformer.eval(), MagvitVAE(VAEConfig.from_dict(VAE_CONFIG)).eval()


def run_generation(variant: str, parallel=None, cache: bool = False, context: int | None = None) -> torch.Tensor:
    """Final latents of a 3-step Flow run of the tiny V5.1 ``variant`` (InP: from a start image)."""
    transformer, vae = tiny_parts(variant)
    g = torch.Generator().manual_seed(3)
    embeds = [PromptEmbeds(torch.randn(1, 5, TEXT_WIDTH, generator=g), torch.ones(1, 5)) for _ in range(2)]
    image = torch.rand(HEIGHT, WIDTH, 3, generator=g) if variant == "InP" else None
    return generate(
        transformer,
        vae,
        PromptPair(*embeds),
        make_sampler("Flow", "V5.1", 3),
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        guidance=5.0,
        seed=4,
        start_image=image,
        decode=False,
        parallel=parallel,
        step_cache=StepCache([0.0, 0.0, 0.0, 1.0, 0.0], threshold=0.5) if cache else None,
        context=ContextWindows(context, 1) if context else None,
    )


@pytest.mark.parametrize(
    "layout",
    [{"ulysses": 2}, {"ring": 2}, {"ulysses": 2, "ring": 2}],
    ids=["ulysses2", "ring2", "ulysses2-ring2"],
)
def test_sequence_parallel_attention_equals_one_process(layout):
    q, k, v = parallel_ranks.random_qkv(0, heads=4, tokens=24)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    world = ParallelLayout(**layout).world_size
    for result in run_ranks(parallel_ranks.attention_rank, world, layout):
        torch.testing.assert_close(result["out"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["T2V", "InP"])
@pytest.mark.parametrize("layout", [{"ulysses": 2}, {"cfg": 2}], ids=["ulysses2", "cfg-parallel2"])
def test_two_processes_give_the_latents_of_one(variant, layout):
    expected = run_generation(variant)
    results = run_ranks(parallel_ranks.generate_rank, 2, layout, variant, {})
    for result in results:  # every rank holds the whole result
        torch.testing.assert_close(result["latents"], expected, atol=1e-5, rtol=1e-5)


def test_ring_ulysses_and_cfg_together_with_step_cache_and_windows():
    """8 ranks would not fit 2 cores' test time: ring 2 x cfg 2 (4 processes), with TeaCache and context windows
    (each window's tokens sharded; the cache decides on the whole signal, so every rank skips the same steps)."""
    kwargs = {"cache": True, "context": 2}
    expected = run_generation("T2V", **kwargs)
    results = run_ranks(parallel_ranks.generate_rank, 4, {"ring": 2, "cfg": 2}, "T2V", kwargs)
    for result in results:
        torch.testing.assert_close(result["latents"], expected, atol=1e-5, rtol=1e-5)


def test_degrees_that_do_not_divide_are_refused_before_work():
    layout = ParallelLayout(ulysses=3)
    with pytest.raises(ValueError, match="Ulysses degree 3 does not divide the model's 4 attention heads"):
        layout.check_model(heads=4, tokens=24)
    with pytest.raises(ValueError, match="25 video tokens do not split evenly over ulysses x ring = 2"):
        ParallelLayout(ring=2).check_model(heads=4, tokens=25)
    with pytest.raises(ValueError, match="3 processes were started but .* = ulysses 2 x ring 1 x cfg 1 = 2"):
        ParallelLayout(ulysses=2).check_world(3)
    with pytest.raises(ValueError, match="CFG degree is 1 or 2"):
        ParallelLayout(cfg=3)


# -- the CLI under torchrun --------------------------------------------------------------------------------------

CLI_SIZE = ["--frames", "9", "--height", "32", "--width", "64", "--steps", "2", "--seed", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("parallel") / "model", "InP")


def cli_generate(model, out, *extra, processes: int = 1):
    """``easyanimate generate`` as a user runs it: plain, or under torchrun with ``processes``."""
    import os
    import subprocess
    import sys

    launch = [sys.executable, "-m", "easyanimate_core.cli"]
    if processes > 1:
        torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port"]
        launch = [sys.executable, *torchrun, str(free_port()), "-m", "easyanimate_core.cli"]
    command = [*launch, "generate", "--model", str(model), "--prompt", "a red circle", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *CLI_SIZE, *extra], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("flags", [["--ulysses-degree", "2"], ["--cfg-parallel"]], ids=["ulysses2", "cfg-parallel"])
def test_torchrun_writes_the_video_of_one_process(tiny_model, tmp_path, flags):
    from easyanimate_core.video_io import read_metadata, read_video

    one = cli_generate(tiny_model, tmp_path / "one", "--image", str(_start_image(tmp_path)))
    assert one.returncode == 0, one.stderr
    two = cli_generate(tiny_model, tmp_path / "two", "--image", str(_start_image(tmp_path)), *flags, processes=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote ") == 1  # rank 0 alone writes
    expected, frames = read_video(tmp_path / "one"), read_video(tmp_path / "two")  # PNG frames: lossless
    assert (frames - expected).abs().max() <= 1 / 255 + 1e-6
    assert "2 processes" in read_metadata(tmp_path / "two")["parallel"]


def _start_image(folder: Path) -> Path:
    from easyanimate_core.video_io import write_video

    path = folder / "start"
    if not path.exists():
        write_video(path, torch.rand(1, 32, 64, 3, generator=torch.Generator().manual_seed(0)))
    return path / "00000.png"


def test_cli_refuses_bad_degrees_before_loading(tiny_model, tmp_path, monkeypatch, capsys):
    from easyanimate_core.cli import main

    args = ["generate", "--model", str(tiny_model), "--prompt", "p", "--out", str(tmp_path / "x.mp4"), *CLI_SIZE]
    assert main([*args, "--ulysses-degree", "2"]) == 2
    assert "start them with torchrun --nproc_per_node 2" in capsys.readouterr().err
    for name, value in {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main([*args, "--ulysses-degree", "4"]) == 2  # the tiny model has 2 heads
    assert "Ulysses degree 4 does not divide the model's 2 attention heads" in capsys.readouterr().err
    assert main([*args, "--ring-degree", "4", "--width", "48"]) == 2  # 3 latent frames x 2 x 3 tokens
    assert (
        "18 video tokens of the clip (9 frames) do not split evenly over ulysses x ring = 4" in capsys.readouterr().err
    )
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main([*args, "--ulysses-degree", "2"]) == 2
    assert "3 processes were started but" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*args, "--cfg-parallel", "--guidance", "1"]) == 2
    assert "--guidance 1.0 has one" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


# -- the worker pool a host drives (ComfyUI) ---------------------------------------------------------------------


def call_inputs(batch: int, frames: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "hidden_states": torch.randn(batch, 16, frames, 4, 8, generator=g),
        "timestep": torch.tensor([700.0] * batch),
        "encoder_hidden_states": torch.randn(batch, 5, TEXT_WIDTH, generator=g),
        "inpaint_latents": torch.randn(batch, 17, frames, 4, 8, generator=g),
    }


@pytest.mark.parametrize("layout", [{"ulysses": 2}, {"cfg": 2}], ids=["ulysses2", "cfg-parallel2"])
def test_worker_pool_predicts_what_the_model_does(layout):
    from easyanimate_core.parallel.workers import WorkerPool

    transformer, _ = tiny_parts("InP")
    inputs = call_inputs(batch=2)  # ComfyUI's batched [uncond ; cond]
    with torch.no_grad():
        expected = transformer(**inputs, rope_temporal_frequency=(0, 0.1))
    pool = WorkerPool(ParallelLayout(**layout), ["cpu", "cpu"], threads=1)
    try:
        pool.load(transformer.config, transformer.state_dict())
        out = pool.forward(inputs, {"rope_temporal_frequency": [0, 0.1], "attention": "sdpa"})
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # new weights (a LoRA patched in): loaded again, and used
            for p in transformer.parameters():
                p.mul_(0.5)
            expected = transformer(**inputs)
        pool.load(transformer.config, transformer.state_dict())
        torch.testing.assert_close(pool.forward(inputs), expected, atol=1e-5, rtol=1e-5)
    finally:
        pool.close()


def test_worker_pool_reports_a_worker_error_and_shuts_down():
    from easyanimate_core.parallel.workers import WorkerError, WorkerPool

    transformer, _ = tiny_parts("InP")
    pool = WorkerPool(ParallelLayout(ulysses=2), ["cpu", "cpu"], threads=1)
    try:
        pool.load(transformer.config, transformer.state_dict())
        inputs = call_inputs(batch=1)
        inputs = {k: v[:, :, :1] if v.ndim == 5 else v for k, v in inputs.items()}  # 1 latent frame: 8 tokens
        inputs["hidden_states"] = inputs["hidden_states"][..., :3]  # 2 x 3 latent grid, patch 2: refused
        inputs["inpaint_latents"] = inputs["inpaint_latents"][..., :3]
        with pytest.raises(WorkerError, match="latent width 3 is not divisible by the patch size 2"):
            pool.forward(inputs)
        assert not pool.alive
    finally:
        pool.close()


def test_worker_pool_start_failure_is_reported():
    from easyanimate_core.parallel.workers import WorkerError, WorkerPool

    with pytest.raises(WorkerError, match="could not start on nodevice:0: Expected one of cpu"):
        WorkerPool(ParallelLayout(ulysses=2), ["cpu", "nodevice:0"], threads=1)


def test_attention_with_log_sum_exp_matches_its_definition():
    from easyanimate_core.parallel.sequence import attention_with_lse, attention_with_lse_explicit, merge_attention

    q, k, v = parallel_ranks.random_qkv(1, heads=2, tokens=40)
    out, lse = attention_with_lse(q, k, v)
    scores = q @ k.transpose(-1, -2) / 4.0  # head_dim 16
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    explicit = attention_with_lse_explicit(q, k, v)
    torch.testing.assert_close(explicit[0], out, atol=1e-5, rtol=1e-5)
    halves = [attention_with_lse(q, k[:, :, s], v[:, :, s]) for s in (slice(0, 20), slice(20, None))]
    torch.testing.assert_close(merge_attention(*halves[0], *halves[1])[0], out, atol=1e-5, rtol=1e-5)


def test_v4_runs_cfg_parallel_and_refuses_sequence_parallel(tmp_path):
    from easyanimate_core.video_io import read_video
    from tests.tiny_checkpoint import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "v4", "InP", version="V4")
    size = ["--frames", "16", "--width", "48"]  # V4: frames 8k
    one = cli_generate(model, tmp_path / "one", *size)
    assert one.returncode == 0, one.stderr
    two = cli_generate(model, tmp_path / "two", *size, "--cfg-parallel", processes=2)
    assert two.returncode == 0, two.stderr
    assert (read_video(tmp_path / "two") - read_video(tmp_path / "one")).abs().max() <= 1 / 255 + 1e-6
    refused = cli_generate(model, tmp_path / "three", *size, "--ulysses-degree", "2", processes=2)
    assert refused.returncode != 0 and "V4 takes --cfg-parallel only" in refused.stderr


def test_v3_image_to_video_runs_cfg_parallel_and_refuses_sequence_parallel(tmp_path):
    from easyanimate_core.video_io import read_video
    from tests.tiny_checkpoint import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "v3", "InP", version="V3")
    size = ["--frames", "8", "--image", str(_start_image(tmp_path))]  # V3: frames 8k; CLIP on the positive branch
    one = cli_generate(model, tmp_path / "one", *size)
    assert one.returncode == 0, one.stderr
    two = cli_generate(model, tmp_path / "two", *size, "--cfg-parallel", processes=2)
    assert two.returncode == 0, two.stderr
    assert (read_video(tmp_path / "two") - read_video(tmp_path / "one")).abs().max() <= 1 / 255 + 1e-6
    refused = cli_generate(model, tmp_path / "three", *size, "--ring-degree", "2", processes=2)
    assert refused.returncode != 0 and "V3 takes --cfg-parallel only" in refused.stderr
