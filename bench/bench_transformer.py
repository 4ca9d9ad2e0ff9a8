"""Transformer forward time, ours vs diffusers, on the same random weights in one run.

    python bench/bench_transformer.py [--dim 512 --layers 8 --mmdit 4 --frames 5 --size 256 --repeats 5]

Both models run the same inputs in float32 with torch.no_grad(); runs alternate between the two so
that machine noise hits both alike, and the median of each is compared. The default geometry has
~63 M parameters (a dual- and single-stream mix like the 7B release). Prints the ratio ours/diffusers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from easyanimate_core.keys import diffusers_to_official
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mmdit", type=int, default=4)
    ap.add_argument("--frames", type=int, default=5, help="latent frames")
    ap.add_argument("--size", type=int, default=256, help="pixel height and width")
    ap.add_argument("--text", type=int, default=64, help="text tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import EasyAnimateTransformer3DModel

    cfg = dict(
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
    torch.manual_seed(0)
    ref = EasyAnimateTransformer3DModel(**cfg).eval()
    ours = EasyAnimateTransformer3D(TransformerConfig.from_dict(cfg), compat="diffusers").eval()
    ours.load_state_dict({diffusers_to_official(k): v for k, v in ref.state_dict().items()})
    params = sum(p.numel() for p in ours.parameters())

    lat = args.size // 8
    x = torch.randn(1, 16, args.frames, lat, lat)
    t = torch.tensor([500.0])
    text = torch.randn(1, args.text, 3584)
    tokens = args.frames * (lat // 2) ** 2

    def run_ours():
        return ours(x, t, text)

    def run_ref():
        return ref(x, t, encoder_hidden_states=text, return_dict=False)[0]

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


if __name__ == "__main__":
    main()
