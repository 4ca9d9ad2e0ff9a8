"""VAE decode benchmark on CPU: ``MagvitVAE`` vs diffusers' ``AutoencoderKLMagvit`` at released size.

Both models are the V5.1 VAE (block_out_channels [128, 256, 512, 512], latent 16, no mid attention)
with the same seeded random weights, decoding the same seeded latents. In one run it prints, for
49 frames at 256x256 (13 latent frames of 32x32), our and diffusers' (default ``decode``) wall time
and peak memory above the loaded weights, the ratios ours/diffusers, and our peak at 145 frames
(37 latents) with its ratio to the 49-frame peak. Targets: peak <= 0.5x diffusers' at <= 1.1x its time;
145-frame peak <= 1.1x the 49-frame peak.

How memory is measured: every measurement runs in a fresh Python subprocess. The worker builds the
model, initialises every parameter in place from a seeded generator (name by name, so both models
get identical weights and no second copy of the weights exists), creates the latents and runs one
small warm-up decode (2 latent frames: oneDNN primitives, thread pool). It then resets the kernel's
RSS high-water mark (``echo 5 > /proc/self/clear_refs``), reads the current RSS as the baseline, runs
the measured decode under ``torch.no_grad`` and reads the high-water mark again
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which the reset also clears). Peak = high-water mark
minus baseline: everything the decode allocated on top of the weights and inputs, the output tensor
included for both (ours preallocates it; diffusers concatenates its chunks into it; the working
memory without it is printed too). PyTorch's CPU allocator returns freed blocks to the OS, so RSS
tracks live tensors; the workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc does not keep freed
blocks resident either. Times are one measured decode after the warm-up: wall clock, and the process's CPU time
(user + system), which is less disturbed by other load on a shared machine.

Usage: ``python bench/bench_vae.py`` (defaults as above; ``--size``/``--frames``/``--threads`` to
change them; ``--threads 2`` matches the dev machine). A full default run takes ~10+ minutes per
49-frame decode on 2 cores (about 900 GFLOP per output frame).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELEASED = dict(block_out_channels=[128, 256, 512, 512], latent_channels=16, layers_per_block=2, norm_num_groups=32)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _init_weights(model, seed: int) -> None:
    """Seeded, name-ordered in-place init: identical for both models, no extra copy of the weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim > 1:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def worker(impl: str, frames: int, size: int, threads: int) -> dict:
    """One decode in this (fresh) process; returns time and memory figures."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    if impl == "ours":
        from easyanimate_core.vae import VAE_V51, MagvitVAE

        model = MagvitVAE(VAE_V51)
    else:
        from diffusers import AutoencoderKLMagvit

        model = AutoencoderKLMagvit(**RELEASED)
    model.eval().requires_grad_(False)
    _init_weights(model, seed=0)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, (frames - 1) // 4 + 1, size // 8, size // 8, generator=g)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def decode(latents):
        with torch.no_grad():
            return model.decode(latents) if impl == "ours" else model.decode(latents).sample

    decode(z[:, :, :2])  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark (Linux >= 4.0)
    baseline = _rss_bytes()
    before = _maxrss_bytes()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    out = decode(z)
    seconds = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    peak = _maxrss_bytes()
    return dict(
        impl=impl,
        frames=frames,
        size=size,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        peak_above_weights=peak - baseline,
        loading_highwater_above_baseline=before - baseline,
        weights=weights,
        out_shape=list(out.shape),
        out_bytes=out.numel() * out.element_size(),
        out_checksum=[float(out.double().mean()), float(out.double().abs().mean())],
    )


def run_worker(impl: str, frames: int, size: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--frames", str(frames), "--size", str(size)]
    cmd += ["--threads", str(threads)]
    # A fixed mmap threshold stops glibc from keeping freed blocks below 32 MiB resident, so RSS follows
    # the live tensors for both implementations (same setting for both; it costs a little time).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{res.stderr[-4000:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    if result["loading_highwater_above_baseline"] > 16 << 20:
        print(f"warning: {impl}: the high-water reset did not take; its peak may include loading")
    mib = result["peak_above_weights"] / 2**20
    wall, cpu = result["seconds"], result["cpu_seconds"]
    print(
        f"  {impl:9s} {frames:4d} frames {size}px: {wall:7.1f} s wall {cpu:7.1f} s CPU  peak {mib:7.1f} MiB", flush=True
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["ours", "diffusers"])
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--long-frames", type=int, default=145)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.frames, args.size, args.threads)))
        return

    print(f"V5.1 VAE decode, CPU, {args.threads} threads, random weights (peak = RSS above loaded weights)")
    ref = run_worker("diffusers", args.frames, args.size, args.threads)
    ours = run_worker("ours", args.frames, args.size, args.threads)
    long = run_worker("ours", args.long_frames, args.size, args.threads)
    same = all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(ours["out_checksum"], ref["out_checksum"], strict=True))
    print(f"weights: {ours['weights'] / 2**20:.1f} MiB; outputs agree (mean, mean|x|): {same}")
    time_ratio = ours["seconds"] / ref["seconds"]
    cpu_ratio = ours["cpu_seconds"] / ref["cpu_seconds"]
    peak_ratio = ours["peak_above_weights"] / ref["peak_above_weights"]
    print(
        f"ours/diffusers at {args.frames} frames: time {time_ratio:.2f}x (<= 1.1x; CPU time {cpu_ratio:.2f}x), ", end=""
    )
    print(f"peak {peak_ratio:.2f}x (<= 0.5x)")
    ratio = long["peak_above_weights"] / ours["peak_above_weights"]
    print(f"ours peak {args.long_frames} vs {args.frames} frames: {ratio:.2f}x (target <= 1.1x)")
    # The float32 output itself grows with the length; show the working memory without it as well.
    work = [r["peak_above_weights"] - r["out_bytes"] for r in (ours, long)]
    print(f"  without the output tensor: {work[0] / 2**20:.1f} -> {work[1] / 2**20:.1f} MiB ({work[1] / work[0]:.2f}x)")


if __name__ == "__main__":
    main()
