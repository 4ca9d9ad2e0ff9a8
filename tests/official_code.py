"""The official V1-V3-era code (an extracted aigc-apps/EasyAnimate checkout, f9eeabe or fb0916f) in parity tests.

Its ``easyanimate/__init__.py`` and several subpackage ``__init__`` files import the UI and training stacks, so the
packages are put in ``sys.modules`` as stubs with only their ``__path__``; a checkout of another commit imported
before is dropped first. Two shims stay for the process: a ``pkg_resources`` stand-in where setuptools no longer
ships it (the official attention modules import it for a version check) and diffusers' old
``FromOriginalVAEMixin`` name (the V2-era VAE file imports it; the V3-era one falls back itself).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

PACKAGES = (
    "easyanimate",
    "easyanimate.models",
    "easyanimate.pipeline",
    "easyanimate.utils",
    "easyanimate.vae",
    "easyanimate.vae.ldm",
    "easyanimate.vae.ldm.models",
    "easyanimate.vae.ldm.modules",
)


def _shim_old_names() -> None:
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from packaging.version import parse

        stub = types.ModuleType("pkg_resources")
        stub.parse_version = parse
        sys.modules["pkg_resources"] = stub
    loaders = importlib.import_module("diffusers.loaders")
    if not hasattr(loaders, "FromOriginalVAEMixin"):
        loaders.FromOriginalVAEMixin = loaders.FromOriginalModelMixin


def install_official_packages(root: str | Path) -> None:
    """Make ``import easyanimate...`` read the checkout at ``root`` (stub packages; see the module docstring)."""
    root = Path(root).resolve()
    if not (root / "easyanimate" / "models").is_dir():
        pytest.fail(f"{root} is not an EasyAnimate checkout (no easyanimate/models/)")
    _shim_old_names()
    for name in [m for m in sys.modules if m == "easyanimate" or m.startswith("easyanimate.")]:
        del sys.modules[name]
    for name in PACKAGES:
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package


def official_module(root: str | Path, name: str) -> types.ModuleType:
    """The module ``name`` (e.g. "easyanimate.models.transformer3d") of the checkout at ``root``."""
    loaded = sys.modules.get("easyanimate")
    if loaded is None or getattr(loaded, "__path__", [None])[0] != str(Path(root).resolve() / "easyanimate"):
        install_official_packages(root)
    return importlib.import_module(name)
