"""Sampling wall time with the speed options, against our own plain run and diffusers, on the same random weights.

    python bench/bench_speed.py [--dim 512 --layers 8 --mmdit 4 --frames 5 --size 256 --steps 12 --threads 2]

One run of each, in this order, all on the bench geometry of bench_transformer.py (random weights: time does not
depend on their values): diffusers' transformer in a plain CFG loop, our plain loop (pipeline.denoise), ours with
step caching (threshold 0.1, the released V5.1-12B polynomial: how many steps a cache skips depends on the
trajectory, so the figure that carries over is time per block pass, printed with the pass share), with CFG skipping
(the last 25% of the steps), and with compiled blocks (the first run compiles; the second is timed). Prints each
wall time and its ratio to our plain run and to diffusers. Quality of the cache is measured on the micro model
(bench/eval_micro.py --cache), not here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_transformer import add_geometry_arguments, build, config  # noqa: E402

from easyanimate_core.pipeline import denoise  # noqa: E402
from easyanimate_core.regional_compile import compile_blocks  # noqa: E402
from easyanimate_core.sampling import make_sampler  # noqa: E402
from easyanimate_core.step_cache import RELEASED_COEFFICIENTS, StepCache  # noqa: E402
from easyanimate_core.text_encoders import PromptEmbeds, PromptPair  # noqa: E402


def prompts(args) -> PromptPair:
    g = torch.Generator().manual_seed(2)
    return PromptPair(
        *(PromptEmbeds(torch.randn(1, args.text, 3584, generator=g), torch.ones(1, args.text)) for _ in "ab")
    )


def latents(args) -> torch.Tensor:
    lat = args.size // 8
    return torch.randn(1, 16, args.frames, lat, lat, generator=torch.Generator().manual_seed(1))


def ours(model, args, **options) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        denoise(model, latents(args), make_sampler("Flow", "V5.1", args.steps), prompts(args), 6.0, {}, None, **options)
    return time.perf_counter() - started


def diffusers_loop(model, args) -> float:
    """The same Flow steps and batched CFG, calling diffusers' transformer."""
    sampler, pair = make_sampler("Flow", "V5.1", args.steps), prompts(args)
    text = torch.cat([pair.negative.embeds, pair.positive.embeds])
    x = latents(args)
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(sampler.num_steps):
            t = sampler.timesteps[i : i + 1]
            out = model(torch.cat([x, x]), t.expand(2), encoder_hidden_states=text, return_dict=False)[0]
            uncond, cond = out.chunk(2)
            x = sampler.step(uncond + 6.0 * (cond - uncond), i, x)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_geometry_arguments(ap)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = config(args)
    reference = build("diffusers", cfg)
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "w.safetensors")
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, weights)
        model = build("ours", cfg, weights)
    times = {"diffusers": diffusers_loop(reference, args)}
    del reference
    times["ours"] = ours(model, args)
    cache = StepCache(RELEASED_COEFFICIENTS[("V5.1", 48, 3072)], 0.1)
    times["ours + step cache 0.1"] = ours(model, args, step_cache=cache)
    times["ours + CFG skip 25% at the end"] = ours(model, args, cfg_skip=0.25)
    compile_blocks(model)
    compiling = ours(model, args)
    times["ours + compiled blocks"] = ours(model, args)

    print(
        f"{args.steps} Flow steps, batched CFG, {args.layers} layers x {args.dim}, {args.frames} latent frames at "
        f"{args.size}px, {args.threads} threads (compiling took {compiling:.1f} s in the first compiled run)"
    )
    for name, seconds in times.items():
        print(
            f"  {name:32s} {seconds:7.2f} s  {seconds / times['ours']:.2f}x ours  "
            f"{seconds / times['diffusers']:.2f}x diffusers"
        )
    print(f"  step cache: {cache.passes} of {cache.passes + cache.skips} block passes run ({cache.pass_share:.0%})")


if __name__ == "__main__":
    main()
