"""Regenerate tests/data/official_v3_keys.tsv.gz and tests/data/v3_reference.npz from the official V1-V3 class.

    python bench/official_v3.py --official /path/to/EasyAnimate-f9eeabe     (git archive f9eeabe easyanimate | tar -x)

Keys: the official ``Transformer3DModel`` (easyanimate/models/transformer3d.py at f9eeabe) built on the meta device
with PixArt-XL-2-512x512's transformer config.json plus each release's yaml ``transformer_additional_kwargs``
(config/easyanimate_video_{slicevae_motion_module_v3, magvit_motion_module_v2, motion_module_v1}.yaml); V3 with
12 input channels (InP). Reference: the official forward on the tiny configurations of tests/test_transformer_v3.py.
Needs diffusers (0.42 works), einops and PyYAML.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "data" / "official_v3_keys.tsv.gz"
REFERENCE = ROOT / "tests" / "data" / "v3_reference.npz"
PIXART_XL_2_512 = dict(
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, attention_type="default",
    caption_channels=4096, cross_attention_dim=1152, double_self_attention=False, dropout=0.0, in_channels=4,
    norm_elementwise_affine=False, norm_eps=1e-6, norm_num_groups=32, norm_type="ada_norm_single",
    num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28, only_cross_attention=False, out_channels=8,
    patch_size=2, sample_size=64, upcast_attention=False, use_linear_projection=False,
)  # fmt: skip
YAMLS = {
    "v3_xl_inp": ("config/easyanimate_video_slicevae_motion_module_v3.yaml", 12),
    "v2_xl": ("config/easyanimate_video_magvit_motion_module_v2.yaml", 4),
    "v1_xl": ("config/easyanimate_video_motion_module_v1.yaml", 4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="an extracted aigc-apps/EasyAnimate at f9eeabe")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import yaml

    from tests.test_transformer_v3 import TINY, official_class, official_forward

    cls = official_class(str(args.official))
    rows = []
    for model_id, (path, in_channels) in YAMLS.items():
        extra = yaml.safe_load((args.official / path).read_text())["transformer_additional_kwargs"]
        with torch.device("meta"):
            model = cls(**dict(PIXART_XL_2_512, in_channels=in_channels, **extra))
        rows += [f"{model_id}\t{k}\t{tuple(v.shape)}\t" for k, v in model.state_dict().items()]
    header = (
        "# official Transformer3DModel @ f9eeabe, PixArt-XL-2-512x512 config + release yaml: "
        "v3_xl_inp (in_channels 12), v2_xl, v1_xl\n"
    )
    with gzip.open(KEYS, "wt", encoding="utf-8") as f:
        f.write(header + "model\tkey\tshape\tnote\n" + "\n".join(rows) + "\n")
    print(f"wrote {KEYS} ({len(rows)} tensors)")
    outputs = {variant: official_forward(cls, variant).numpy() for variant in TINY}
    np.savez_compressed(REFERENCE, **outputs)
    print(f"wrote {REFERENCE}: " + ", ".join(f"{k} {v.shape}" for k, v in outputs.items()))


if __name__ == "__main__":
    main()
