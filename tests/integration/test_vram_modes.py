"""ComfyUI's VRAM modes with our pack: a server started with each of --highvram / --normalvram / --lowvram /
--novram / --cpu runs the text-to-video graph, and every mode saves the same frames.

The VRAM modes only exist with an accelerator (ComfyUI refuses to start without one unless --cpu is given), so
on a CPU-only machine only --cpu runs and the others skip, saying so; the weight-streaming path that --lowvram
and --novram use is also exercised on the CPU by test_native_model.py's forced partial load.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from comfy_harness import ComfyServer
from test_native_model import text_to_video_prompt

from tests.comfy_standin import link_tree
from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration

MODES = ["--highvram", "--normalvram", "--lowvram", "--novram", "--cpu"]


def comfy_has_accelerator(python: str) -> bool:
    probe = "import torch; print(torch.cuda.is_available() or torch.backends.mps.is_available())"
    return subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "True"


@pytest.fixture(scope="module")
def frames_per_mode(tmp_path_factory) -> dict[str, np.ndarray]:
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI checkout to run the integration tests against")
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    modes = MODES if comfy_has_accelerator(python) else ["--cpu"]
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-v51-inp", "InP", version="V5.1")
    results = {}
    for mode in modes:
        base = tmp_path_factory.mktemp(mode.strip("-"))
        (base / "models" / "EasyAnimate").mkdir(parents=True)
        link_tree(checkpoint, base / "models" / "EasyAnimate" / "tiny-v51-inp")
        server = ComfyServer(Path(comfy_path), base, python=python, extra_args=[mode])
        try:
            server.start(timeout=float(os.environ.get("COMFYUI_START_TIMEOUT", "180")))
            entry = server.run_prompt(text_to_video_prompt("tiny-v51-inp", "V5.1", frames=5), timeout=300)
            files = sorted(server.output_files(entry))
            results[mode] = np.stack([iio.imread(f) for f in files])
        finally:
            server.stop()
    return results


def needs(frames_per_mode: dict, mode: str) -> np.ndarray:
    if mode not in frames_per_mode:
        pytest.skip(f"{mode} needs an accelerator; ComfyUI's Python here has none (CPU-only torch or no GPU)")
    return frames_per_mode[mode]


@pytest.mark.parametrize("mode", MODES)
def test_mode_runs_text_to_video(frames_per_mode, mode):
    assert needs(frames_per_mode, mode).shape == (5, 32, 64, 3)


@pytest.mark.parametrize("mode", MODES[:-1])
def test_mode_saves_nearly_the_same_frames_as_cpu(frames_per_mode, mode):
    # GPU kernels differ from the CPU's in the last bits; after 3 sampling steps and 8-bit quantisation a few
    # pixel levels is the expected spread, a broken load is not.
    difference = np.abs(needs(frames_per_mode, mode).astype(int) - frames_per_mode["--cpu"].astype(int))
    assert difference.mean() < 2.0 and difference.max() <= 16, (difference.mean(), difference.max())
