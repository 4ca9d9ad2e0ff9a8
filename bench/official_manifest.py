"""Regenerate tests/data/official_extra_keys.tsv.gz: tensor names and shapes of released models the spec's
manifest lacks, from the official class built on the meta device (no weights).

    python bench/official_manifest.py --official /path/to/EasyAnimate     (a checkout of aigc-apps/EasyAnimate)

v51_7b_camera: the official EasyAnimateTransformer3DModel with V5.1-7B's configuration (the one that reproduces
the manifest's v51_7b_control exactly, checked here first) and 38 input channels (noise 16, camera rays 6,
reference 16) as the Control-Camera pipeline feeds it. Imports only easyanimate/models (with stub parent packages,
as tests/test_v4_official.py does); needs diffusers.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "official_extra_keys.tsv.gz"
V51_7B = dict(num_attention_heads=48, attention_head_dim=64, out_channels=16, patch_size=2, num_layers=36,
              mmdit_layers=18, time_embed_dim=512, add_norm_text_encoder=True, text_embed_dim=3584,
              text_embed_dim_t5=None, time_position_encoding_type="3d_rope", after_norm=False,
              resize_inpaint_mask_directly=True, enable_text_attention_mask=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="a checkout of aigc-apps/EasyAnimate")
    args = ap.parse_args()
    os.environ["EASYANIMATE_OFFICIAL_PATH"] = str(args.official)
    sys.path.insert(0, str(ROOT))
    from tests.manifest import manifest
    from tests.test_v4_official import official_class

    official_class()  # puts the stub parent packages in place
    official = importlib.import_module("easyanimate.models.transformer3d").EasyAnimateTransformer3DModel

    def shapes(in_channels: int) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = official(in_channels=in_channels, **V51_7B)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    if shapes(48) != manifest("v51_7b_control"):
        raise SystemExit("the V5.1-7B configuration here no longer reproduces the manifest's v51_7b_control")
    rows = [f"v51_7b_camera\t{key}\t{shape}\t" for key, shape in shapes(38).items()]
    header = "# v51_7b_camera = official EasyAnimateTransformer3DModel, V5.1-7B-Control-Camera (in_channels 38)\n"
    with gzip.open(OUT, "wt", encoding="utf-8") as f:
        f.write(header + "model\tkey\tshape\tnote\n" + "\n".join(rows) + "\n")
    print(f"wrote {OUT} ({len(rows)} tensors)")


if __name__ == "__main__":
    main()
