"""Transformer forward time, ours vs diffusers, on the same random weights in one run.

    python bench/bench_transformer.py [--dim 512 --layers 8 --mmdit 4 --frames 5 --size 256 --repeats 5]

Both models run the same inputs in float32 with torch.no_grad(); runs alternate between the two so
that machine noise hits both alike, and the median of each is compared. Peak memory of one forward
is measured in a fresh process per model (VmHWM minus VmRSS once weights and inputs are in memory).
The default geometry has ~66 M parameters (a dual- and single-stream mix like the 7B release).
Prints the ratios ours/diffusers.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from easyanimate_core.keys import diffusers_to_official
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def build(impl: str, cfg: dict, weights: str | None = None):
    """Our model or diffusers', in eval mode, with the weights file's tensors when given."""
    from diffusers import EasyAnimateTransformer3DModel

    if impl == "diffusers":
        model = EasyAnimateTransformer3DModel(**cfg).eval()
        if weights:
            model.load_state_dict(load_file(weights))
        return model
    model = EasyAnimateTransformer3D(TransformerConfig.from_dict(cfg), compat="diffusers").eval()
    if weights:
        model.load_state_dict({diffusers_to_official(k): v for k, v in load_file(weights).items()})
    return model


def inputs(args):
    g = torch.Generator().manual_seed(1)
    lat = args.size // 8
    return (
        torch.randn(1, 16, args.frames, lat, lat, generator=g),
        torch.tensor([500.0]),
        torch.randn(1, args.text, 3584, generator=g),
    )


def forward(impl: str, model, x, t, text):
    if impl == "diffusers":
        return model(x, t, encoder_hidden_states=text, return_dict=False)[0]
    return model(x, t, text)


def peak_memory_child(args) -> None:
    """Run one forward of one implementation and print the peak memory above weights and inputs."""
    model = build(args.impl, config(args), args.weights)
    x, t, text = inputs(args)
    before = _status("VmRSS")
    with torch.no_grad():
        forward(args.impl, model, x, t, text)
    print(_status("VmHWM") - before)


def peak_memory(impl: str, args, weights: str) -> int:
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--weights", weights]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("dim", "layers", "mmdit", "frames", "size", "text", "threads")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return int(out.stdout.strip().splitlines()[-1])


def config(args) -> dict:
    return dict(
        num_attention_heads=args.dim // 64,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        patch_size=2,
        num_layers=args.layers,
        mmdit_layers=args.mmdit,
        time_embed_dim=512,
        text_embed_dim=3584,
        add_norm_text_encoder=True,
    )


def add_geometry_arguments(ap: argparse.ArgumentParser) -> None:
    """The bench transformer's geometry and input size (shared with bench_speed.py)."""
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mmdit", type=int, default=4)
    ap.add_argument("--frames", type=int, default=5, help="latent frames")
    ap.add_argument("--size", type=int, default=256, help="pixel height and width")
    ap.add_argument("--text", type=int, default=64, help="text tokens")


def main() -> None:
    ap = argparse.ArgumentParser()
    add_geometry_arguments(ap)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return peak_memory_child(args)

    cfg = config(args)
    torch.manual_seed(0)
    ref = build("diffusers", cfg)
    ours = build("ours", cfg)
    ours.load_state_dict({diffusers_to_official(k): v for k, v in ref.state_dict().items()})
    params = sum(p.numel() for p in ours.parameters())
    x, t, text = inputs(args)
    tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)

    def run_ours():
        return forward("ours", ours, x, t, text)

    def run_ref():
        return forward("diffusers", ref, x, t, text)

    times = {"ours": [], "diffusers": []}
    with torch.no_grad():
        diff = (run_ours() - run_ref()).abs().max().item()  # also a warm-up for both
        for _ in range(args.repeats):
            for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"transformer: {params / 1e6:.1f} M params, {tokens} video + {args.text} text tokens, float32, CPU")
    print(f"max|ours - diffusers| = {diff:.3g}")
    for name, m in med.items():
        print(f"{name:10s} forward median {m:.3f} s  (runs: {', '.join(f'{s:.3f}' for s in times[name])})")
    print(f"time ratio ours/diffusers = {med['ours'] / med['diffusers']:.3f}  (target <= 1.0)")

    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "weights.safetensors")
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, weights)
        peaks = {impl: peak_memory(impl, args, weights) for impl in ("ours", "diffusers")}
    for name, peak in peaks.items():
        print(f"{name:10s} forward peak memory above weights and inputs {peak / 2**20:.0f} MiB")
    print(f"peak memory ratio ours/diffusers = {peaks['ours'] / peaks['diffusers']:.3f}")


if __name__ == "__main__":
    main()
