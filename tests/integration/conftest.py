"""Fixtures for the real-ComfyUI integration tests (see comfy_harness.py for the environment)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
from comfy_harness import ComfyServer


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
