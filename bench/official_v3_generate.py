"""Regenerate tests/data/v3_generate_reference.npz: the official V1 / V2 / V3 pipelines' videos on the tiny folders.

    python bench/official_v3_generate.py --official-v3 /path/to/EasyAnimate-f9eeabe --official-v2 /path/to/-fb0916f

(each an extracted ``git archive <commit> easyanimate config | tar -x``). Runs ``tests/test_generate_v3.official``
for every case of that test: the same tiny folders (tests/tiny_checkpoint.py, fixed seeds), noise and inputs.
Needs diffusers (0.42 works), einops and PyYAML.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "v3_generate_reference.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-v3", required=True, type=Path, help="an extracted aigc-apps/EasyAnimate at f9eeabe")
    ap.add_argument("--official-v2", required=True, type=Path, help="an extracted aigc-apps/EasyAnimate at fb0916f")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.test_generate_v3 import CASES, case_id, official
    from tests.tiny_checkpoint import write_tiny_checkpoint

    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {v: write_tiny_checkpoint(Path(tmp) / v, version=v) for v in {v for v, _ in CASES}}
        for version, case in CASES:
            root = args.official_v2 if version == "V2" else args.official_v3
            with pytest.MonkeyPatch.context() as monkeypatch:
                video = official(folders[version], version, case, str(root), monkeypatch)
            outputs[case_id(version, case)] = video.float().numpy()
    np.savez_compressed(REFERENCE, **outputs)
    print(f"wrote {REFERENCE}: " + ", ".join(f"{k} {v.shape}" for k, v in outputs.items()))


if __name__ == "__main__":
    main()
