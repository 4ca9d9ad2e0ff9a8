"""Memory of long clips: the VAE decode stays flat in the clip's length, and so does a long CLI generation.

1. VAE decode working memory (the released V5.1 VAE graph, random weights, float32, 64 x 64 pixels) at 49, 145
   and 289 frames, each in a fresh process (bench_vae_memory.py's method: RSS high-water mark after a reset,
   output preallocated). The decode is chunked in latent frames, so only the output grows with the length.
2. Peak RSS of whole ``easyanimate generate`` runs (a fresh process each: the built-in micro model at
   --size pixels, --steps steps): 49 frames in one pass, then 145 frames in 49-frame windows (--context-method
   windows), in 49-frame parts (parts) and, for contrast, in one pass. Printed: each peak, the peak above a
   1-frame run of the same size (the process, weights and libraries), and the ratios against the 49-frame run.
   Issue 18's target: 145 frames in windows within 1.2x of the 49-frame run.

    python bench/bench_long_video.py [--size 256] [--steps 4] [--threads 2]     (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vae import ROOT, _maxrss_bytes, _rss_bytes  # noqa: E402

DECODE_FRAMES = (49, 145, 289)


def decode_worker(frames: int, threads: int) -> dict:
    """Working memory of one chunked decode of ``frames`` frames (64 x 64) in this fresh process."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from easyanimate_core.vae import VAE_V51, MagvitVAE

    model = MagvitVAE(VAE_V51).eval().requires_grad_(False)
    latent_frames = VAE_V51.latent_frames(frames)
    z = torch.randn(1, 16, latent_frames, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.decode(z[:, :, :2, :4, :4])  # warm-up
        out = torch.empty(1, 3, frames, 64, 64)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        baseline = _rss_bytes()
        model.decode(z, out=out)
        return {"peak": _maxrss_bytes() - baseline, "output": out.numel() * 4}


def generate_worker(argv: list[str]) -> dict:
    """Peak RSS of one ``easyanimate generate`` run in this fresh process."""
    sys.path.insert(0, str(ROOT))
    from easyanimate_core.cli import main

    code = main(argv)
    if code:
        raise SystemExit(code)
    return {"peak": _maxrss_bytes()}


def run_worker(kind: str, payload) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps([kind, payload])]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="generation runs: width and height in pixels")
    ap.add_argument("--steps", type=int, default=4, help="generation runs: sampling steps")
    args = ap.parse_args()
    if args.worker:
        kind, payload = json.loads(args.worker)
        result = decode_worker(*payload) if kind == "decode" else generate_worker(payload)
        print(json.dumps(result))
        return

    mib = 2**20
    print("VAE decode (released V5.1 graph, 64 x 64, float32): working memory beyond the preallocated output")
    first = None
    for frames in DECODE_FRAMES:
        r = run_worker("decode", [frames, args.threads])
        first = first or r["peak"]
        print(
            f"  {frames:3d} frames: {r['peak'] / mib:7.1f} MiB ({r['peak'] / first:.2f}x the 49-frame decode); "
            f"output {r['output'] / mib:6.1f} MiB",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        common = ["generate", "--prompt", "a red circle moving right slowly on a navy background"]
        common += ["--width", str(args.size), "--height", str(args.size), "--steps", str(args.steps)]
        runs = {
            "1 frame (baseline)": ["--frames", "1"],
            "49 frames, one pass": ["--frames", "49"],
            "145 frames, 49-frame windows": [
                "--frames",
                "145",
                "--context-frames",
                "49",
                "--context-method",
                "windows",
            ],
            "145 frames, 49-frame parts": ["--frames", "145", "--context-frames", "49", "--context-method", "parts"],
            "145 frames, one pass": ["--frames", "145"],
        }
        print(f"easyanimate generate (micro model, {args.size} x {args.size}, {args.steps} steps): peak RSS")
        peaks = {}
        for i, (name, extra) in enumerate(runs.items()):
            argv = [*common, *extra, "--out", str(Path(tmp) / f"{i}.mp4")]
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
            peaks[name] = run_worker("generate", argv)["peak"]
        base, single = peaks["1 frame (baseline)"], peaks["49 frames, one pass"]
        for name, peak in peaks.items():
            print(
                f"  {name:30s} {peak / mib:7.1f} MiB, {(peak - base) / mib:7.1f} MiB above the 1-frame run; "
                f"{peak / single:.2f}x the 49-frame run ({(peak - base) / max(single - base, 1):.2f}x above baseline)",
                flush=True,
            )


if __name__ == "__main__":
    main()
