"""Speed-up of parallel generation (issue 21): random-weight V5.1-12B at 576 x 1008 x 49, CFG on, Flow steps.

    torchrun --nproc_per_node 8 bench/bench_parallel.py               on a box with 8 GPUs (also 2 or 4)
    torchrun --nproc_per_node 2 bench/bench_parallel.py --config tiny --size 64x64 --frames 9 --steps 3   CPU dry run

Every rank builds the same random weights (speed does not depend on their values). First rank 0 alone samples
(the one-GPU reference, measured in the same run), then every layout whose processes fit the world size runs on
exactly that many ranks: Ulysses n, ring n, Ulysses x ring, and each with CFG-parallel. Printed per layout: seconds
per step (mean after the first), speed-up over one GPU, and the largest latent difference from the reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_speed_table import CONFIGS, build  # noqa: E402

from easyanimate_core.parallel import ParallelLayout, init_distributed  # noqa: E402
from easyanimate_core.parallel.layout import make_groups  # noqa: E402
from easyanimate_core.pipeline import denoise  # noqa: E402
from easyanimate_core.sampling import make_sampler  # noqa: E402
from easyanimate_core.text_encoders import PromptEmbeds, PromptPair  # noqa: E402


def layouts(world: int, heads: int) -> list[ParallelLayout]:
    """Every layout of exactly ``world`` processes whose Ulysses degree divides the heads."""
    found = []
    for cfg in (1, 2):
        for ring in range(1, world + 1):
            if world % (cfg * ring) == 0 and heads % (world // (cfg * ring)) == 0:
                found.append(ParallelLayout(ulysses=world // (cfg * ring), ring=ring, cfg=cfg))
    return found


def sample(model, args, device, groups=None) -> tuple[float, torch.Tensor]:
    """(seconds per step after the first, final latents) of one run; every rank of ``groups`` calls it."""
    h, w = args.size
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, (args.frames - 1) // 4 + 1, h // 8, w // 8, generator=g).to(device, torch.bfloat16)
    width = model.config.text_embed_dim
    text = PromptPair(*[PromptEmbeds(torch.randn(1, 256, width, generator=g), torch.ones(1, 256)) for _ in "ab"])
    inpaint = {"inpaint_latents": torch.zeros(1, 17, *latents.shape[2:], device=device, dtype=torch.bfloat16)}
    times = []

    def progress(done, total):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter())

    started = time.perf_counter()
    sampler = make_sampler("Flow", "V5.1", args.steps)
    with torch.no_grad():
        out = denoise(model, latents, sampler, text, 6.0, inpaint, None, progress=progress, parallel=groups)
    steps = [b - a for a, b in zip([started, *times[:-1]], times, strict=True)]
    return sum(steps[1:]) / max(len(steps) - 1, 1), out.float().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="12b")
    ap.add_argument("--size", default="576x1008", type=lambda s: tuple(int(v) for v in s.split("x")))
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = build(CONFIGS[args.config], "bf16", device)  # the same random weights on every rank (same seed)
    reference = None
    if rank == 0:
        print(f"V5.1 {args.config}, {args.size[0]}x{args.size[1]}x{args.frames}, {args.steps} Flow steps, CFG 6")
        one, reference = sample(model, args, device)
        print(f"  one process: {one:7.2f} s/step", flush=True)
    dist.barrier()
    for layout in layouts(world, model.config.num_attention_heads):
        per_step, out = sample(model, args, device, make_groups(layout))
        if rank == 0:
            error = (out - reference).abs().max().item()
            print(f"  {layout.describe():40s} {per_step:7.2f} s/step  {one / per_step:5.2f}x  max diff {error:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
