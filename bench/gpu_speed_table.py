"""The GPU speed and memory table of issue 17: random-weight V5.1-12B at 576 x 1008 x 49, 25 Flow steps.

    python bench/gpu_speed_table.py                       on a GPU (about 2 min per row on an H200)
    python bench/gpu_speed_table.py --config tiny --size 64x64 --frames 9 --steps 3    dry run on a CPU

Rows: weights in bf16, fp8 (e4m3, cast per layer: ops.manual_cast), GGUF Q8_0 and Q4_K (kept in blocks,
dequantized per layer: quant.layers), each without and with step caching (threshold 0.1, the published
V5.1-12B polynomial); then sequential offload (bf16 weights on the CPU, streamed per layer), whose peak is the
least VRAM a run needs. Printed per row: seconds per step (mean of the steps after the first), peak VRAM
(torch.cuda.max_memory_allocated: weights + activations), and the block passes the cache ran. Weights are
random (speed and memory do not depend on their values) and made on the device, one layer at a time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate_core import ops  # noqa: E402
from easyanimate_core.offload import store_linear_weights_fp8  # noqa: E402
from easyanimate_core.pipeline import denoise  # noqa: E402
from easyanimate_core.quant.blocks import quantize  # noqa: E402
from easyanimate_core.quant.layers import gguf_operations  # noqa: E402
from easyanimate_core.sampling import make_sampler  # noqa: E402
from easyanimate_core.step_cache import RELEASED_COEFFICIENTS, StepCache  # noqa: E402
from easyanimate_core.text_encoders import PromptEmbeds, PromptPair  # noqa: E402
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig  # noqa: E402

CONFIGS = {  # V5.1-12B-InP (spec §3), and a tiny one for a CPU dry run
    "12b": TransformerConfig(num_attention_heads=48, attention_head_dim=64, in_channels=33, num_layers=48,
                             mmdit_layers=48, text_embed_dim=3584, add_norm_text_encoder=True),
    "tiny": TransformerConfig(num_attention_heads=4, attention_head_dim=64, in_channels=33, num_layers=2,
                              mmdit_layers=2, time_embed_dim=256, text_embed_dim=256, add_norm_text_encoder=True),
}  # fmt: skip


def build(config: TransformerConfig, weights: str, device: torch.device) -> nn.Module:
    """A random-weight transformer with its Linear weights in ``weights`` (bf16, fp8, Q8_0, Q4_K), on ``device``."""
    namespace = {"bf16": nn, "fp8": ops.manual_cast}.get(weights) or gguf_operations(nn)
    with torch.device("meta"):
        model = EasyAnimateTransformer3D(config, dtype=torch.bfloat16, operations=namespace)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():  # matrices random, norm scales 1, biases 0
            if p.ndim > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    if weights == "fp8":
        store_linear_weights_fp8(model.transformer_blocks)
    elif weights in ("Q8_0", "Q4_K"):
        block = 32 if weights == "Q8_0" else 256
        for module in model.transformer_blocks.modules():
            if isinstance(module, nn.Linear) and module.weight.shape[1] % block == 0:
                shape = tuple(module.weight.shape)
                module.weight = nn.Parameter(quantize(module.weight.detach(), weights).to(device), requires_grad=False)
                module.quant_kind, module.quant_shape = weights, shape
    return model.eval()


def run(model, args, device, cache: StepCache | None, stream_from_cpu: bool = False) -> tuple[float, int]:
    """(seconds per step after the first, peak bytes on the device) of one sampling run."""
    h, w = args.size
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, (args.frames - 1) // 4 + 1, h // 8, w // 8, generator=g).to(device, torch.bfloat16)
    text = [
        PromptEmbeds(torch.randn(1, 256, model.config.text_embed_dim, generator=g), torch.ones(1, 256)) for _ in "ab"
    ]
    inpaint = {"inpaint_latents": torch.zeros(1, 17, *latents.shape[2:], device=device, dtype=torch.bfloat16)}
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler = make_sampler("Flow", "V5.1", args.steps)

    def progress(done, total):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter())

    started = time.perf_counter()
    with torch.no_grad():
        denoise(model, latents, sampler, PromptPair(*text), 6.0, inpaint, None, progress=progress, step_cache=cache)
    steps = [b - a for a, b in zip([started, *times[:-1]], times, strict=True)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return sum(steps[1:]) / max(len(steps) - 1, 1), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="12b")
    ap.add_argument("--size", default="576x1008", type=lambda s: tuple(int(v) for v in s.split("x")))
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rows", nargs="+", default=["bf16", "fp8", "Q8_0", "Q4_K", "sequential"])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = CONFIGS[args.config]
    coefficients = RELEASED_COEFFICIENTS[("V5.1", 48, 3072)]
    print(f"V5.1 {args.config}, {args.size[0]}x{args.size[1]}x{args.frames}, {args.steps} Flow steps, {device}")
    for row in args.rows:
        if row == "sequential":  # bf16 weights stay on the CPU; each layer's weight is fetched when it runs
            model = build(config, "fp8", torch.device("cpu"))
            for module in model.modules():  # undo the fp8 storage: casting layers with bf16 weights on the CPU
                if isinstance(module, nn.Linear) and module.weight.dtype == torch.float8_e4m3fn:
                    module.weight = nn.Parameter(module.weight.to(torch.bfloat16), requires_grad=False)
            per_step, peak = run(model, args, device, None)
            print(f"  sequential offload (bf16 on the CPU): {per_step:6.2f} s/step, peak {peak / 2**30:6.2f} GiB")
            continue
        model = build(config, row, device)
        for cached in (False, True):
            cache = StepCache(coefficients, 0.1) if cached else None
            per_step, peak = run(model, args, device, cache)
            passes = f", {cache.passes} of {cache.passes + cache.skips} block passes" if cache else ""
            label = f"{row}{' + step cache 0.1' if cached else ''}"
            print(f"  {label:26s} {per_step:6.2f} s/step, peak {peak / 2**30:6.2f} GiB{passes}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
