"""The released models' tensor names and shapes, from ../shared/spec/easyanimate_keys.tsv."""

from __future__ import annotations

import ast
import os
from functools import cache
from pathlib import Path

import pytest

_CANDIDATES = [
    os.environ.get("EASYANIMATE_KEYS_TSV", ""),
    Path(__file__).resolve().parents[1] / "shared" / "spec" / "easyanimate_keys.tsv",
    Path(__file__).resolve().parents[2] / "shared" / "spec" / "easyanimate_keys.tsv",
]


def manifest_path() -> Path:
    for c in _CANDIDATES:
        if c and Path(c).is_file():
            return Path(c)
    pytest.fail(
        "easyanimate_keys.tsv not found (looked beside the repo in shared/spec/); set EASYANIMATE_KEYS_TSV to its path"
    )


@cache
def _all() -> dict[str, dict[str, tuple[int, ...]]]:
    models: dict[str, dict[str, tuple[int, ...]]] = {}
    for line in manifest_path().read_text().splitlines():
        if not line or line.startswith("#") or line.startswith("model\t"):
            continue
        model, key, shape = line.split("\t")[:3]
        models.setdefault(model, {})[key] = tuple(ast.literal_eval(shape))
    return models


def manifest(model: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of one model id in the manifest (e.g. 'v51_12b_inp')."""
    return dict(_all()[model])
