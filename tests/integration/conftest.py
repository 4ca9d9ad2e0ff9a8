"""Fixtures for the real-ComfyUI integration tests (see comfy_harness.py for the environment)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
from comfy_harness import ComfyServer
from frontend import chromium_path, open_frontend


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
