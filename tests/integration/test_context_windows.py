"""ComfyUI's own context-window node on our MODEL in a real server, on tiny random V5.1 InP checkpoints.

The stock "WAN Context Windows (Manual)" node (windows along the latent time axis, given in video frames) wraps
our MODEL; ComfyUI then samples each window on its own. 0.3.x cuts only the noise to a window, 0.8 also the
conditioning: the MODEL cuts what is left (nodes/native_model.py), so text- and image-to-video both run.
"""

from __future__ import annotations

import re
import uuid

import pytest
import torch
from safetensors.torch import load_file
from test_conditioning import base_graph, conditioning_node, load_image, our_sampler, save_latent, saved_video_frames
from test_conditioning import setup as setup  # noqa: PLC0414 (the module fixture, shared)

pytestmark = pytest.mark.integration

LONG = {"width": 32, "height": 16, "frames": 97, "batch_size": 1}  # 25 latent frames of 4 x 2
WINDOW, OVERLAP = 49, 16  # 13 latent frames, 4 shared


def context_node(server, length: int = WINDOW, overlap: int = OVERLAP) -> dict:
    """The stock WAN context-window node on model "1" with every input at the running ComfyUI's default (0.8 adds
    some), windows in order ("standard_static"), blended "pyramid"."""
    spec = server.get_json("/object_info/WanContextWindowsManual")["WanContextWindowsManual"]["input"]["required"]
    inputs = {name: (info[1] or {}).get("default") for name, info in spec.items() if len(info) > 1}
    inputs.update(
        model=["1", 0],
        context_length=length,
        context_overlap=overlap,
        context_schedule="standard_static",
        fuse_method="pyramid",
    )
    return {"class_type": "WanContextWindowsManual", "inputs": inputs}


def long_graph(server, images: bool, context: dict | None, prefix: str | None = None) -> dict:
    """97 frames through the tiny InP model: start + end images (EasyAnimate Image To Video) or text only (empty
    latent); the sampler on the context-window node's MODEL when ``context`` is given; SaveLatent with ``prefix``."""
    graph = base_graph()
    sampler = our_sampler(model="9" if context else "1", steps=2)
    if images:
        graph.update({"7": load_image("start.png"), "8": load_image("end.png")})
        graph["6"] = conditioning_node(
            "EasyAnimateImageToVideo", noise_aug_strength=0.0563, start_image=["7", 0], end_image=["8", 0]
        )
        graph["6"]["inputs"].update(LONG)
    else:
        graph["6"] = {"class_type": "EasyAnimateEmptyLatentVideo", "inputs": {"version": "V5.1", **LONG}}
        sampler["inputs"].update(positive=["3", 0], negative=["4", 0], latent=["6", 0])
    graph["10"] = sampler
    if context:
        graph["9"] = context
    if prefix:
        for key in ("20", "21", "22"):
            del graph[key]
        graph["40"] = save_latent("10", prefix)
    return graph


def windows_logged(server, since: int) -> list[str]:
    """ComfyUI's own log lines about context windows after log offset ``since``."""
    # 0.3.x: "Using context windows 13 for 25 frames."; 0.8: "... 13 with overlap 4 for 25 frames."
    return re.findall(r"Using context windows (\d+)(?: with overlap \d+)? for (\d+) frames", server.log_text()[since:])


@pytest.mark.parametrize("images", [False, True], ids=["text-to-video", "image-to-video"])
def test_stock_context_windows_make_97_frames_from_smaller_windows(setup, images):
    """Text-to-video through an InP model (all-zero inpaint latents), and start + end images (inpaint latents cut to
    each window): 97 frames, sampled in windows of 13 of the 25 latent frames."""
    since = len(setup.log_text())
    graph = long_graph(setup, images, context_node(setup))
    assert saved_video_frames(setup, setup.run_prompt(graph, timeout=600)) == LONG["frames"]
    logged = windows_logged(setup, since)
    assert logged and set(logged) == {("13", "25")}, logged


def saved_latent(server, graph: dict, prefix: str) -> torch.Tensor:
    [file] = [f for f in server.output_files(server.run_prompt(graph, timeout=600)) if f.name.startswith(prefix)]
    return load_file(file)["latent_tensor"]


def test_one_window_as_long_as_the_clip_equals_an_ordinary_run(setup):
    """Same seed, image-to-video: one window of all 97 frames gives the ordinary run's latents (the node adds nothing
    but windows), and 49-frame windows give other latents (the windows really ran)."""
    prefix = uuid.uuid4().hex[:8]
    runs = {
        "ordinary": None,
        "whole": context_node(setup, length=LONG["frames"]),
        "windows": context_node(setup),
    }
    latents = {
        name: saved_latent(setup, long_graph(setup, True, context, f"{prefix}_{name}"), f"{prefix}_{name}")
        for name, context in runs.items()
    }
    assert latents["ordinary"].shape == (1, 16, 25, 2, 4)
    torch.testing.assert_close(latents["whole"], latents["ordinary"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latents["windows"], latents["ordinary"], atol=1e-3)
