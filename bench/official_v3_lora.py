"""Regenerate tests/data/official_v3_lora_keys.tsv.gz: the LoRA tensors the official V1-V3 trainer creates.

    python bench/official_v3_lora.py --official /path/to/EasyAnimate-f9eeabe     (git archive f9eeabe | tar -x)

For each released configuration (the models of bench/official_v3.py: v3_xl_inp, v2_xl, v1_xl), the official
``Transformer3DModel`` is built on the meta device and given the official ``create_network`` (easyanimate/utils/
lora_utils.py at f9eeabe) with the trainer's settings (scripts/train_t2iv_lora.py: add_lora_in_attn_temporal=True,
transformer only; rank 4, alpha 1 here: names and shapes do not depend on them). One line per tensor: model, key,
shape. Needs diffusers (0.42 works), transformers, einops and PyYAML.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import io
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "data" / "official_v3_lora_keys.tsv.gz"


def official_lora_utils(official: Path):
    """easyanimate/utils/lora_utils.py of the checkout, imported on its own (it needs diffusers and transformers)."""
    spec = importlib.util.spec_from_file_location("official_lora_utils", official / "easyanimate/utils/lora_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_network(lora_utils, transformer: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    """The official trainer's LoRA network on ``transformer`` (its prints silenced), applied as the trainer does."""
    with contextlib.redirect_stdout(io.StringIO()):
        network = lora_utils.create_network(1.0, rank, alpha, [], transformer, add_lora_in_attn_temporal=True)
        network.apply_to([], transformer, apply_text_encoder=False, apply_unet=True)
    return network


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="an extracted aigc-apps/EasyAnimate at f9eeabe")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import yaml

    from bench.official_v3 import PIXART_XL_2_512, YAMLS
    from tests.test_transformer_v3 import official_class

    cls = official_class(str(args.official))
    lora_utils = official_lora_utils(args.official)
    rows = []
    for model_id, (path, in_channels) in YAMLS.items():
        extra = yaml.safe_load((args.official / path).read_text())["transformer_additional_kwargs"]
        with torch.device("meta"):
            model = cls(**dict(PIXART_XL_2_512, in_channels=in_channels, **extra))
            network = official_network(lora_utils, model, rank=4, alpha=1.0)
        rows += [f"{model_id}\t{k}\t{tuple(v.shape)}" for k, v in network.state_dict().items()]
    header = (
        "# official create_network(add_lora_in_attn_temporal=True) @ f9eeabe on the released Transformer3DModel "
        "configurations, rank 4\n"
    )
    with gzip.open(KEYS, "wt", encoding="utf-8") as f:
        f.write(header + "model\tkey\tshape\n" + "\n".join(rows) + "\n")
    print(f"wrote {KEYS} ({len(rows)} tensors)")


if __name__ == "__main__":
    main()
