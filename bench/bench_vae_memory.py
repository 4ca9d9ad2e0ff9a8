"""How the V5.1 VAE's decode / encode working memory scales with the input (CPU, released size, float32).

The ComfyUI VAE (nodes/vae_nodes.py) plans memory with ``easyanimate_core.vae.decode_memory`` /
``encode_memory``; this script measures what those formulas model. Each measurement runs in a fresh
subprocess (bench_vae.py's method: reset the RSS high-water mark after a warm-up, peak = high-water mark
minus the RSS before the call, ``MALLOC_MMAP_THRESHOLD_=65536``). The output tensor is preallocated
before the reset, so the figures are working memory only (the output's size is known exactly).

Printed per run: pixel size, latent frames, chunk, tile, the peak in MiB and in float32 elements per
latent pixel (decode) or per pixel of a chunk (encode), next to the formula's value. Usage:
``python bench/bench_vae_memory.py [--threads 2]`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vae import ROOT, _maxrss_bytes, _rss_bytes  # noqa: E402

DECODE_RUNS = [  # (pixel size, latent frames, chunk_latents, tile_latent_size)
    (64, 2, 1, None),
    (64, 4, 1, None),
    (64, 4, 3, None),
    (128, 2, 1, None),
    (128, 2, 1, 8),
    (192, 2, 1, None),
]
ENCODE_RUNS = [  # (pixel size, frames, chunk_frames, tile_latent_size)
    (64, 9, 4, None),
    (64, 9, 8, None),
    (128, 5, 4, None),
    (128, 5, 4, 8),
]


def worker(op: str, size: int, length: int, chunk: int, tile: int | None, threads: int) -> dict:
    """One decode or encode in this (fresh) process; returns the peak above the RSS before the call."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from easyanimate_core.vae import VAE_V51, MagvitVAE, decode_memory, encode_memory

    model = MagvitVAE(VAE_V51).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    with torch.no_grad():
        if op == "decode":
            z = torch.randn(1, 16, length, lat, lat, generator=g)
            model.decode(z[:, :, :2, :4, :4])  # warm-up
            out = torch.empty(1, 3, model.video_frames(length), size, size)

            def run():
                return model.decode(z, chunk_latents=chunk, tile_latent_size=tile, out=out)

            formula = decode_memory(model.config, z.shape, torch.float32, chunk, tile)
        else:
            x = torch.rand(1, 3, length, size, size, generator=g) * 2 - 1
            model.encode(x[:, :, :5, :32, :32])  # warm-up

            def run():
                return model.encode(x, chunk_frames=chunk, tile_latent_size=tile)

            formula = encode_memory(model.config, x.shape, torch.float32, chunk, tile)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        baseline = _rss_bytes()
        run()
        peak = _maxrss_bytes() - baseline
    return dict(peak=peak, formula=formula)


def measure(op, size, length, chunk, tile, threads) -> None:
    cmd = [sys.executable, __file__, "--worker", json.dumps([op, size, length, chunk, tile]), "--threads", str(threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    r = json.loads(res.stdout.strip().splitlines()[-1])
    lat = size // 8
    area = (min(tile, lat) if tile else lat) ** 2  # latent pixels decoded at once
    unit = area if op == "decode" else chunk * (min(tile * 8, size) if tile else size) ** 2
    per = r["peak"] / 4 / unit
    print(
        f"{op:6s} {size:4d}px len {length:2d} chunk {chunk} tile {tile}: peak {r['peak'] / 2**20:7.1f} MiB "
        f"= {per:8.0f} fp32/{'latent px' if op == 'decode' else 'chunk px'}; formula {r['formula'] / 2**20:7.1f} MiB",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker), args.threads)))
        return
    for run in DECODE_RUNS:
        measure("decode", *run, args.threads)
    for run in ENCODE_RUNS:
        measure("encode", *run, args.threads)


if __name__ == "__main__":
    main()
