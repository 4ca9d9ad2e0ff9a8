"""How V1's image VAE (the SD AutoencoderKL, ``easyanimate_core.image_vae``) decode / encode working memory scales.

The ComfyUI VAE (nodes/vae_nodes.py) plans an ImageVAE's memory with ``easyanimate_core.image_vae.decode_memory``
/ ``encode_memory``; this script measures what those formulas model, with bench_vae_memory.py's method: one
fresh subprocess per run at the released SD geometry in float32, the RSS high-water mark reset after a warm-up,
peak = high-water mark minus the RSS before the call, ``MALLOC_MMAP_THRESHOLD_=65536``, output preallocated
(decode) so the figures are working memory only.

Printed per run: pixel size, frames, frames per call (chunk), tile, the peak in MiB and in float32 elements per
latent pixel of one frame (decode) or per pixel of one frame (encode) decoded / encoded at once, next to the
formula's value. Usage: ``python bench/bench_image_vae_memory.py [--threads 1]`` (a few minutes on 1 core).
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
    (128, 2, 1, None),
    (128, 2, 2, None),
    (128, 4, 4, None),
    (128, 2, 1, 8),
    (192, 1, 1, None),
    (256, 1, 1, None),
]
ENCODE_RUNS = [  # (pixel size, frames, chunk_frames, tile_latent_size)
    (64, 2, 1, None),
    (128, 2, 1, None),
    (128, 2, 2, None),
    (128, 4, 4, None),
    (128, 2, 1, 8),
    (192, 1, 1, None),
    (256, 1, 1, None),
]


def worker(op: str, size: int, length: int, chunk: int, tile: int | None, threads: int) -> dict:
    """One decode or encode in this (fresh) process; returns the peak above the RSS before the call."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from easyanimate_core.image_vae import IMAGE_VAE_SD, ImageVAE, decode_memory, encode_memory

    model = ImageVAE(IMAGE_VAE_SD).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    with torch.no_grad():
        if op == "decode":
            z = torch.randn(1, 4, length, lat, lat, generator=g)
            model.decode(z[:, :, :1, :4, :4])  # warm-up
            out = torch.empty(1, 3, length, size, size)

            def run():
                return model.decode(z, chunk_latents=chunk, tile_latent_size=tile, out=out)

            formula = decode_memory(model.config, z.shape, torch.float32, chunk, tile)
        else:
            x = torch.rand(1, 3, length, size, size, generator=g) * 2 - 1
            model.encode(x[:, :, :1, :32, :32])  # warm-up

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
    side = min(tile, lat) if tile else lat  # latent side decoded / encoded at once
    unit = chunk * side**2 if op == "decode" else chunk * (side * 8) ** 2
    per = r["peak"] / 4 / unit
    print(
        f"{op:6s} {size:4d}px len {length:2d} chunk {chunk} tile {tile}: peak {r['peak'] / 2**20:7.1f} MiB "
        f"= {per:8.0f} fp32/{'latent px' if op == 'decode' else 'px'} per frame; formula {r['formula'] / 2**20:7.1f} "
        "MiB",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker")
    ap.add_argument("--threads", type=int, default=1)
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
