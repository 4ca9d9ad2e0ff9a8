"""Fixtures for the real-ComfyUI integration tests (see comfy_harness.py for the environment)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
from comfy_harness import ComfyServer
from frontend import chromium_path, open_frontend


def checkout_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and link under ``root`` with its size and modification time (a link: its target's length)."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            state[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return state


@pytest.fixture(scope="session", autouse=True)
def comfy_checkout_unchanged():
    """The integration tests leave the ComfyUI checkout exactly as found: no file or link added, changed or
    removed (bytecode included), checked after the whole session."""
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        yield
        return
    before = checkout_state(Path(comfy_path))
    yield
    after = checkout_state(Path(comfy_path))
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert (added, removed, changed) == ([], [], []), (
        f"the integration tests changed the ComfyUI checkout {comfy_path}: added {added[:10]}, removed "
        f"{removed[:10]}, changed {changed[:10]}"
    )


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory):
    """A running ComfyUI server with this pack installed; skips when COMFYUI_PATH is unset."""
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI checkout to run the integration tests against")
    server = ComfyServer(
        Path(comfy_path),
        tmp_path_factory.mktemp("comfy_base"),
        python=os.environ.get("COMFYUI_PYTHON") or None,
        extra_args=shlex.split(os.environ.get("COMFYUI_ARGS", "--cpu")),
    )
    try:
        server.start(timeout=float(os.environ.get("COMFYUI_START_TIMEOUT", "180")))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(comfy_server):
    """The ComfyUI frontend loaded in headless Chromium (see frontend.py); skips when Playwright or a Chromium
    binary is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed")
    if chromium_path() is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set CHROMIUM_PATH)")
    with open_frontend(sync_api, comfy_server.url) as pg:
        yield pg
