"""Camera and trajectory control in a real ComfyUI server: the wrong model variant is refused before the first
step, naming the node to use (the bundled workflows themselves run in test_workflows.py)."""

from __future__ import annotations

import pytest
from comfy_harness import ComfyError
from test_conditioning import base_graph, our_sampler
from test_conditioning import setup as setup  # noqa: PLC0414 (the module fixture, shared)

from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration

CAMERA = "tiny-v51-camera"
SIZE = {"width": 64, "height": 32, "frames": 5, "batch_size": 1}


@pytest.fixture(scope="module")
def camera_setup(setup):
    folder = setup.base_dir / "models" / "EasyAnimate" / CAMERA
    if not folder.is_dir():
        write_tiny_checkpoint(folder, "Camera", version="V5.1")
    return setup


def camera_graph(folder: str) -> dict:
    graph = base_graph(folder)
    motion = {"motion": "Pan Left", "motion_2": "Zoom In", "speed": 1.0, "frames": 5}
    graph["30"] = {"class_type": "EasyAnimateCameraMotion", "inputs": motion}
    graph["6"] = {
        "class_type": "EasyAnimateCameraControl",
        "inputs": {"positive": ["3", 0], "negative": ["4", 0], "vae": ["5", 0], "camera": ["30", 0], **SIZE},
    }
    graph["10"] = our_sampler(steps=2)
    return graph


def trajectory_graph(folder: str) -> dict:
    graph = base_graph(folder)
    points = '[{"x": 5, "y": 5}, {"x": 15, "y": 8}, {"x": 25, "y": 11}, {"x": 35, "y": 14}, {"x": 45, "y": 17}]'
    graph["30"] = {"class_type": "EasyAnimateTrajectory", "inputs": {"coordinates": points, "width": 64, "height": 32}}
    graph["6"] = {
        "class_type": "EasyAnimateControlVideo",
        "inputs": {"positive": ["3", 0], "negative": ["4", 0], "vae": ["5", 0], "video": ["30", 0], **SIZE},
    }
    graph["10"] = our_sampler(steps=2)
    return graph


def test_camera_and_trajectory_run_on_their_models(camera_setup):
    for graph in (camera_graph(CAMERA), trajectory_graph("tiny-v51-control")):
        camera_setup.run_prompt(graph, timeout=300)


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (lambda: camera_graph("tiny-v51-control"), "needs a V5.1 Control-Camera model"),
        (lambda: trajectory_graph(CAMERA), "Control-Camera model: it follows camera poses"),
    ],
    ids=["camera-on-control", "trajectory-on-camera"],
)
def test_the_wrong_variant_is_refused_naming_the_node(camera_setup, graph, message):
    with pytest.raises(ComfyError) as err:
        camera_setup.run_prompt(graph(), timeout=300)
    assert message in str(err.value)
    assert "EasyAnimate Camera Control" in str(err.value) or "EasyAnimate Control Video" in str(err.value)
