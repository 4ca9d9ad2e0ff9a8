"""Every bundled workflow (workflows/*.json) loads in the real frontend with no missing node, converts with
app.graphToPrompt, and runs through /prompt to a saved video, with its model names pointed at tiny checkpoints
and its sizes, frame counts and steps made small."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from comfy_harness import PACK_DIR_NAME, REPO_ROOT
from frontend import APP
from workflow_specs import TINY_STAND_INS, WORKFLOWS

from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration

WORKFLOW_FILES = sorted((REPO_ROOT / "workflows").glob("*.json"))
# Small enough for a CPU run; each still a valid size / frame count for V5.1.
SMALL = {"width": 64, "height": 32, "frames": 9, "steps": 2}

LOAD = f"""async (workflow) => {{
  const app = {APP};
  const registered = window.LiteGraph.registered_node_types;
  const missing = workflow.nodes.map((n) => n.type).filter((t) => !(t in registered));
  await app.loadGraphData(workflow);
  const dialog = [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText).join("\\n");
  const {{ output }} = await app.graphToPrompt();
  return {{ missing, dialog, output }};
}}"""


@pytest.fixture(scope="module")
def tiny_models(comfy_server) -> dict[str, str]:
    """Released folder name -> the tiny stand-in written in the server's models/EasyAnimate/."""
    root = comfy_server.base_dir / "models" / "EasyAnimate"
    for name, variant, version in TINY_STAND_INS.values():
        if not (root / name).is_dir():
            write_tiny_checkpoint(root / name, variant, version=version)
    return {released: name for released, (name, _, _) in TINY_STAND_INS.items()}


def test_every_spec_has_its_workflow_and_thumbnail():
    names = {make().name for make in WORKFLOWS}
    assert {p.stem for p in WORKFLOW_FILES} == names
    assert all((REPO_ROOT / "workflows" / f"{name}.jpg").is_file() for name in names)


def test_template_browser_lists_the_workflows(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates[PACK_DIR_NAME]) == sorted(p.stem for p in WORKFLOW_FILES)


def small_prompt(output: dict, tiny: dict, input_dir: Path) -> dict:
    """The converted prompt with tiny model folders, small sizes and steps, and its input images written."""
    rng = np.random.default_rng(0)
    for node in output.values():
        inputs = node["inputs"]
        for name, value in list(inputs.items()):
            if isinstance(value, list):
                continue  # a link
            if name == "model_folder":
                inputs[name] = tiny[value]
            elif name in SMALL:
                inputs[name] = SMALL[name]
        if node["class_type"] == "LoadImage":
            image = (rng.random((SMALL["height"], SMALL["width"], 3)) * 255).astype(np.uint8)
            iio.imwrite(input_dir / inputs["image"], image)
    return output


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_loads_converts_and_runs_to_a_video(comfy_server, page, tiny_models, path):
    workflow = json.loads(path.read_text())
    result = page.evaluate(LOAD, workflow)
    assert result["missing"] == [], result["missing"]
    assert "Missing" not in result["dialog"], result["dialog"]
    prompt = small_prompt(result["output"], tiny_models, comfy_server.base_dir / "input")
    entry = comfy_server.run_prompt(prompt, timeout=600)
    videos = [f for f in comfy_server.output_files(entry) if f.suffix in (".mp4", ".webm", ".webp", ".gif")]
    assert len(videos) == 1, entry["outputs"]
    frames = iio.imread(videos[0])
    assert frames.shape == (SMALL["frames"], SMALL["height"], SMALL["width"], 3), frames.shape
