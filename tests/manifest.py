"""The released models' tensor names and shapes, from tests/data/easyanimate_keys.tsv.gz and
tests/data/official_extra_keys.tsv.gz.

The first is a gzip copy of the spec's easyanimate_keys.tsv (one line per tensor: model id, key, shape,
note), kept in the repository so that a clone anywhere runs the manifest tests with no file outside it; the
second adds models the spec lacks, built from the official classes (bench/official_manifest.py).
"""

from __future__ import annotations

import ast
import gzip
from functools import cache
from pathlib import Path

MANIFEST_PATH = Path(__file__).resolve().parent / "data" / "easyanimate_keys.tsv.gz"
EXTRA_PATH = MANIFEST_PATH.with_name("official_extra_keys.tsv.gz")
V3_PATH = MANIFEST_PATH.with_name("official_v3_keys.tsv.gz")  # V1-V3, bench/official_v3.py


@cache
def _all() -> dict[str, dict[str, tuple[int, ...]]]:
    models: dict[str, dict[str, tuple[int, ...]]] = {}
    for path in (MANIFEST_PATH, EXTRA_PATH, V3_PATH):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f.read().splitlines():
                if not line or line.startswith("#") or line.startswith("model\t"):
                    continue
                model, key, shape = line.split("\t")[:3]
                models.setdefault(model, {})[key] = tuple(ast.literal_eval(shape))
    return models


def manifest(model: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of one model id in the manifest (e.g. 'v51_12b_inp')."""
    return dict(_all()[model])
