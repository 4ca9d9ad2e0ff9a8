"""Fit a model's step-cache (TeaCache) polynomial from its own sampled trajectories, and write it beside the model.

    python bench/fit_step_cache.py                               the built-in micro model (writes step_cache.json)
    python bench/fit_step_cache.py --model <folder> --prompt "..." --prompt "..." --frames 49 --width 672 --height 384

Method (TeaCache's): sample with every block pass run and, for each branch and every step but the first, record
x = the relative L1 change of the first block's timestep-modulated input since the previous step and y = the
relative L1 change of the block stack's output; fit y ~ polynomial(x) of degree 4 by least squares
(numpy.polyfit). The polynomial turns an input change, which costs one adaLN, into an estimate of the output
change, which costs the whole model; the cache sums the estimates and recomputes when the sum passes its
threshold. Prompts: the micro model's training captions (none of the held-out ones bench/eval_micro.py scores),
one seed each; for another model, give prompts of the kind it will be used for. The fit's R^2 is printed.
The released V5.1-12B, V5.1-7B and V5-7B polynomials are EasyAnimate's own (step_cache.RELEASED_COEFFICIENTS);
V5-12B and V4 need this script run on their weights (a GPU: 50 steps at the released size per prompt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate_core.atomic import atomic_path  # noqa: E402
from easyanimate_core.micro import data  # noqa: E402
from easyanimate_core.step_cache import COEFFICIENTS_FILE, StepCache  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "easyanimate_core" / "micro_model"))
    p.add_argument("--prompt", action="append", help="prompts to sample (default: micro training captions)")
    p.add_argument("--samples", type=int, default=24, help="micro model: how many training captions")
    p.add_argument("--frames", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--degree", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="print the fit, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace the model folder's existing step_cache.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from easyanimate_core.cli import read_folder_defaults
    from easyanimate_core.loading import load_transformer, load_vae
    from easyanimate_core.pipeline import generate, model_version
    from easyanimate_core.sampling import DEFAULTS, make_sampler
    from easyanimate_core.text_encoders import load_text_encoders

    root = Path(args.model)
    if (root / COEFFICIENTS_FILE).exists() and not (args.dry_run or args.overwrite):
        p.error(f"{root / COEFFICIENTS_FILE} exists; pass --overwrite to replace it (or --dry-run to only print)")
    defaults = read_folder_defaults(root)
    transformer = load_transformer(root, dtype=torch.float32)
    version = model_version(transformer)
    vae = load_vae(root, dtype=torch.float32)
    text = load_text_encoders(root, version.lower(), dtype=torch.float32)
    sampler_name, steps, guidance = DEFAULTS[version]
    sampler_name = defaults.get("sampler", sampler_name)
    steps = args.steps or defaults.get("steps", steps)
    guidance = args.guidance if args.guidance is not None else defaults.get("guidance", guidance)
    size = {k: getattr(args, k) or defaults.get(k) for k in ("frames", "width", "height")}
    if None in size.values():
        p.error("give --frames, --width and --height (this model folder has no generation_defaults.json)")
    prompts = args.prompt or [a.caption for a in data.training_attributes()[:: max(1, 288 // args.samples)]]

    cache = StepCache([0.0], threshold=0.0, record=True)
    for seed, prompt in enumerate(tqdm(prompts, desc="sampling", unit="video")):
        generate(
            transformer,
            vae,
            text.encode(prompt),
            make_sampler(sampler_name, version, steps),
            **size,
            guidance=guidance,
            seed=seed,
            step_cache=cache,
            decode=False,
        )
    x, y = np.array([r for r in cache.records if np.isfinite(r[0])]).T
    coefficients = np.polyfit(x, y, args.degree)
    fitted = np.polyval(coefficients, x)
    r2 = 1 - ((y - fitted) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    print(f"{len(x)} step pairs from {len(prompts)} videos; input change {x.min():.4f}-{x.max():.4f}")
    print(f"coefficients (highest power first): {[float(c) for c in coefficients]}; R^2 = {r2:.3f}")
    if not args.dry_run:
        record = {
            "coefficients": [float(c) for c in coefficients],
            "r2": round(float(r2), 4),
            "fitted_on": f"{len(prompts)} videos, {steps} {sampler_name} steps, guidance {guidance}, {size}",
            "method": "bench/fit_step_cache.py",
        }
        target = root / COEFFICIENTS_FILE
        with atomic_path(target) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
