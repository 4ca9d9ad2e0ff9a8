"""Regenerate tests/data/official_v2v3_vae_keys.tsv.gz and tests/data/v2v3_vae_reference.npz from the official code.

    python bench/official_v2v3_vae.py --official-v3 /path/to/EasyAnimate-f9eeabe \
        --official-v2 /path/to/EasyAnimate-fb0916f --taming /path/with/taming

(``git archive <commit> easyanimate | tar -x`` gives a checkout; ``pip download --no-deps taming-transformers``
and unzipping the wheel gives the taming folder.)
Needs diffusers (0.42 works) and einops.

Keys: the official ``AutoencoderKLMagvit`` built on the meta device with the released settings (V3: f9eeabe,
``slice_compression_vae`` true, chunks 8 / 2; V2: fb0916f, the class defaults, chunks 9 / 3; both with the
released block types), plus the tensors the released files also carry from training: the official trainer's
loss module ``LPIPSWithDiscriminator`` (easyanimate/vae/ldm/modules/losses/contperceptual.py at f9eeabe: the
official Discriminator3D, taming's NLayerDiscriminator and LPIPS), saved under ``loss.`` and ignored by the
official ``from_pretrained`` (strict=False). The public V3 load log (96 unexpected ``loss.*`` keys: discriminator,
discriminator3d, logvar, perceptual_loss) matches this module's 96 tensors. torchvision is not needed: LPIPS's
VGG16 is stood in by its layer layout (configuration "D", the 13 convolutions of ``vgg16().features``) and its
pretrained loading is skipped; the names and shapes are what matter.

Reference: the outputs of tests/test_vae_v2v3.py's CASES, from the official code.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "data" / "official_v2v3_vae_keys.tsv.gz"
REFERENCE = ROOT / "tests" / "data" / "v2v3_vae_reference.npz"
BLOCKS = dict(
    down_block_types=["SpatialDownBlock3D"] + ["SpatialTemporalDownBlock3D"] * 3,
    up_block_types=["SpatialUpBlock3D"] + ["SpatialTemporalUpBlock3D"] * 3,
)
RELEASED = {
    "vae_v3": dict(BLOCKS, slice_compression_vae=True, mini_batch_encoder=8, mini_batch_decoder=2),
    "vae_v2": dict(BLOCKS),  # the class defaults: slice_compression_vae false, 9 / 3
}
# The VAE trainer's loss settings (easyanimate/vae/configs/autoencoder/autoencoder_kl_32x32x4_slice.yaml).
LOSS = dict(disc_start=50001, kl_weight=1.0e-06, disc_weight=0.5, l2_loss_weight=0.0, l1_loss_weight=1.0)
VGG16_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg16_stand_in(pretrained=False, **_):
    """torchvision's vgg16 layer layout (its ``features``: conv, ReLU, max-pool), without weights."""
    layers, cin = [], 3
    for v in VGG16_D:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return types.SimpleNamespace(features=nn.Sequential(*layers))


def training_loss_keys(official_v3: Path, taming: Path) -> dict[str, tuple]:
    """{"loss." + key: shape} of the official trainer's LPIPSWithDiscriminator."""
    sys.path.insert(0, str(taming))
    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.SimpleNamespace(vgg16=_vgg16_stand_in)
    sys.modules.setdefault("torchvision", torchvision)
    lpips = importlib.import_module("taming.modules.losses.lpips")
    lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None  # a download; shapes only
    for name in ("easyanimate", "easyanimate.vae", "easyanimate.vae.ldm", "easyanimate.vae.ldm.modules"):
        package = types.ModuleType(name)
        package.__path__ = [str(official_v3 / name.replace(".", "/"))]
        sys.modules[name] = package
    loss_cls = importlib.import_module("easyanimate.vae.ldm.modules.losses.contperceptual").LPIPSWithDiscriminator
    loss = loss_cls(**LOSS)
    return {f"loss.{k}": tuple(v.shape) for k, v in loss.state_dict().items()}


class Patch:
    """The part of pytest's monkeypatch that tests/test_vae_v2v3.py's official_output uses."""

    def __init__(self):
        self.saved = []

    def setattr(self, obj, attr, value):
        self.saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def undo(self):
        for obj, attr, value in reversed(self.saved):
            setattr(obj, attr, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-v3", required=True, type=Path, help="an extracted aigc-apps/EasyAnimate at f9eeabe")
    ap.add_argument("--official-v2", required=True, type=Path, help="an extracted aigc-apps/EasyAnimate at fb0916f")
    ap.add_argument("--taming", required=True, type=Path, help="a folder holding the taming package")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import tests.test_vae_v2v3 as t

    roots = {"vae_v3": args.official_v3, "vae_v2": args.official_v2}
    rows = []
    for model_id, config in RELEASED.items():
        with t.official_modules(str(roots[model_id])):
            cls = importlib.import_module("easyanimate.models.autoencoder_magvit").AutoencoderKLMagvit
            with torch.device("meta"):
                model = cls(**config)
        rows += [f"{model_id}\t{k}\t{tuple(v.shape)}\t" for k, v in model.state_dict().items()]
    loss = training_loss_keys(args.official_v3, args.taming)
    for model_id in RELEASED:
        rows += [f"{model_id}\t{k}\t{shape}\ttraining loss, ignored" for k, shape in loss.items()]
    header = (
        "# official AutoencoderKLMagvit on meta with the released settings: vae_v3 (f9eeabe, slice_compression_vae, "
        "8/2), vae_v2 (fb0916f, class defaults 9/3); plus the trainer's loss.* tensors the released files carry\n"
    )
    with gzip.open(KEYS, "wt", encoding="utf-8") as f:
        f.write(header + "model\tkey\tshape\tnote\n" + "\n".join(rows) + "\n")
    print(f"wrote {KEYS} ({len(rows)} rows, {len(loss)} loss tensors per model)")

    t.OFFICIAL.update(v3=str(args.official_v3), v2=str(args.official_v2))
    outputs = {}
    for name, *_ in t.CASES:
        patch = Patch()
        try:
            outputs[name] = t.official_output(name, patch).numpy()
        finally:
            patch.undo()
    np.savez_compressed(REFERENCE, **outputs)
    print(f"wrote {REFERENCE}: " + ", ".join(f"{k} {v.shape}" for k, v in outputs.items()))


if __name__ == "__main__":
    main()
