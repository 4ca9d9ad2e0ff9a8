"""Every bundled workflow (workflows/*.json) loads in the real frontend with no missing node, converts with
app.graphToPrompt, and runs through /prompt to a saved video: the released models' workflows with their model
names pointed at tiny checkpoints and their sizes, frame counts and steps made small; the micro model's as
saved, on the bundled weights, and the video scored for what the prompt asks."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from comfy_harness import PACK_DIR_NAME, REPO_ROOT
from frontend import APP
from safetensors.torch import save_file
from workflow_specs import MICRO_I2V_ATTRIBUTES, MICRO_PREFIX, TINY_STAND_INS, WORKFLOWS

from easyanimate_core.loading import load_transformer
from easyanimate_core.lora import kohya_name
from easyanimate_core.micro import scoring
from easyanimate_core.micro.data import Attributes
from easyanimate_core.micro.model import GENERATION_DEFAULTS
from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration

WORKFLOW_FILES = sorted((REPO_ROOT / "workflows").glob("*.json"))
MICRO_FILES = [p for p in WORKFLOW_FILES if p.stem.startswith(MICRO_PREFIX)]
RELEASED_FILES = [p for p in WORKFLOW_FILES if p not in MICRO_FILES]
# What each micro workflow's prompt asks for (its text must be this caption).
MICRO_PROMPTS = {
    f"{MICRO_PREFIX}Text to Video": Attributes("circle", "red", "right", "slowly", "navy"),
    f"{MICRO_PREFIX}Image to Video": MICRO_I2V_ATTRIBUTES,
    f"{MICRO_PREFIX}LoRA (a new colour)": Attributes("circle", "cyan", "right", "slowly", "navy"),
}
# Small enough for a CPU run; each still a valid size / frame count for V5.1 (V4 / V3: frames in multiples of 8, V2 9).
SMALL = {"width": 64, "height": 32, "frames": 9, "steps": 2}
SMALL_FRAMES = {"V5.1": 9, "V5": 9, "V4": 8, "V3": 8, "V2": 9}


def workflow_version(output: dict) -> str:
    """The version of the released model a converted workflow loads (by its tiny stand-in's entry)."""
    folders = {n["inputs"]["model_folder"] for n in output.values() if "model_folder" in n["inputs"]}
    by_name = {}
    for released, (tiny, _, version) in TINY_STAND_INS.items():
        by_name[released] = by_name[tiny] = version
    versions = {by_name[f] for f in folders}
    assert len(versions) == 1, f"a workflow mixes versions: {folders}"
    return versions.pop()


LOAD = f"""async (workflow) => {{
  const app = {APP};
  const registered = window.LiteGraph.registered_node_types;
  const missing = workflow.nodes.map((n) => n.type).filter((t) => !(t in registered));
  await app.loadGraphData(workflow);
  const dialog = [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText).join("\\n");
  const {{ output }} = await app.graphToPrompt();
  return {{ missing, dialog, output }};
}}"""


# Loads a workflow as opening its file does, with the frontend's workflow validation on, and returns the text of
# every toast (the "Invalid workflow against zod schema" alert is one) and dialog it raised; open ones are closed.
VALIDATE = f"""async (workflow) => {{
  const app = {APP};
  const key = "Comfy.Validation.Workflows";
  const settings = app.extensionManager?.setting;
  if (settings) await settings.set(key, true); else await app.ui.settings.setSettingValueAsync(key, true);
  const texts = (selector) => [...document.querySelectorAll(selector)].map((e) => e.innerText.trim());
  const before = new Set([...texts(".p-toast-message"), ...texts(".p-dialog")]);
  await app.loadGraphData(workflow);
  await new Promise((resolve) => setTimeout(resolve, 1000));  // toasts are raised after the graph is loaded
  const toasts = texts(".p-toast-message").filter((t) => !before.has(t));
  const dialogs = texts(".p-dialog").filter((t) => !before.has(t));
  document.querySelectorAll(".p-toast-close-button, .p-toast-icon-close").forEach((b) => b.click());
  return {{ validation: settings ? settings.get(key) : app.ui.settings.getSettingValue(key), toasts, dialogs }};
}}"""


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_opens_without_a_validation_alert_toast_or_missing_media(page, path):
    """Also no failed request for its example images and videos: the pack copied them into the input folder."""
    failed_before = len(page.bad_responses)
    result = page.evaluate(VALIDATE, json.loads(path.read_text()))
    page.wait_for_timeout(500)  # the media previews load after the graph
    assert result["validation"] is True
    assert result["toasts"] == [], result["toasts"]
    assert [d for d in result["dialogs"] if "Template" not in d] == [], result["dialogs"]
    assert [r for r in page.bad_responses[failed_before:] if "/view?" in r] == []  # stock 404s (userdata) aside


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


# What the template browser fetches for each of a custom node's templates, with the URLs it builds (the name as is).
TEMPLATE_FILES = f"""async ([module, names]) => {{
  const api = {APP}.api ?? window.comfyAPI.api.api;
  const url = (name, ext) => api.apiURL(`/workflow_templates/${{module}}/${{name}}.${{ext}}`);
  const status = async (name, ext) => (await fetch(url(name, ext))).status;
  const out = {{}};
  for (const name of names) out[name] = [await status(name, "json"), await status(name, "jpg")];
  return out;
}}"""


def test_template_browser_lists_the_workflows_by_title_and_serves_their_files(comfy_server, page):
    """The browser shows a template by its file name: released workflows are named by their titles."""
    templates = comfy_server.get_json("/workflow_templates")
    names = sorted(templates[PACK_DIR_NAME])
    assert names == sorted(p.stem for p in WORKFLOW_FILES)
    assert "EasyAnimate V5.1 · Image to Video (start + end)" in names
    assert all(n.startswith("EasyAnimate ") for n in names if n not in {p.stem for p in MICRO_FILES}), names
    assert page.evaluate(TEMPLATE_FILES, [PACK_DIR_NAME, names]) == {n: [200, 200] for n in names}


def write_tiny_lora(path: Path, checkpoint: Path) -> None:
    """An official-layout LoRA on a few Linear layers of the tiny transformer at ``checkpoint``."""
    transformer = load_transformer(checkpoint)
    linears = [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)][:4]
    g, tensors = torch.Generator().manual_seed(0), {}
    for name in linears:
        weight = transformer.get_submodule(name).weight
        tensors[kohya_name(name) + ".lora_down.weight"] = torch.randn(4, weight.shape[1], generator=g) * 0.1
        tensors[kohya_name(name) + ".lora_up.weight"] = torch.randn(weight.shape[0], 4, generator=g) * 0.1
        tensors[kohya_name(name) + ".alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def small_prompt(output: dict, tiny: dict, base_dir: Path) -> dict:
    """The converted prompt with tiny model folders, small sizes and steps, and the files it reads written."""
    rng = np.random.default_rng(0)
    models = base_dir / "models"
    version = workflow_version(output)
    small = {**SMALL, "frames": SMALL_FRAMES[version]}
    for node in output.values():
        inputs = node["inputs"]
        for name, value in list(inputs.items()):
            if isinstance(value, list):
                continue  # a link
            if name == "model_folder":
                inputs[name] = tiny[value]
            elif name in small:
                inputs[name] = small[name]
    for node in output.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LoadImage":
            image = (rng.random((SMALL["height"], SMALL["width"], 3)) * 255).astype(np.uint8)
            iio.imwrite(base_dir / "input" / inputs["image"], image)
        elif kind == "LoadVideo":
            video = (rng.random((SMALL["frames"] + 3, SMALL["height"], SMALL["width"], 3)) * 255).astype(np.uint8)
            iio.imwrite(base_dir / "input" / inputs["file"], video, extension=".mp4", fps=8)
        elif kind == "EasyAnimateLoraLoader":
            model_folder = next(n["inputs"]["model_folder"] for n in output.values() if "model_folder" in n["inputs"])
            write_tiny_lora(models / "loras" / inputs["lora_name"], models / "EasyAnimate" / model_folder)
    return output


def load_and_convert(page, workflow: dict) -> dict:
    """The workflow loaded in the frontend (no missing node, no warning dialog) and converted to an API prompt."""
    result = page.evaluate(LOAD, workflow)
    assert result["missing"] == [], result["missing"]
    assert "Missing" not in result["dialog"], result["dialog"]
    return result["output"]


def run_to_frames(comfy_server, prompt: dict):
    """Run an API prompt through /prompt; the frames of the one video it saves."""
    entry = comfy_server.run_prompt(prompt, timeout=600)
    videos = [f for f in comfy_server.output_files(entry) if f.suffix in (".mp4", ".webm", ".webp", ".gif")]
    assert len(videos) == 1, entry["outputs"]
    return iio.imread(videos[0])


@pytest.mark.parametrize("path", RELEASED_FILES, ids=lambda p: p.stem)
def test_workflow_loads_converts_and_runs_to_a_video(comfy_server, page, tiny_models, path):
    output = load_and_convert(page, json.loads(path.read_text()))
    # The frontend extension's snapping on load keeps the saved frame counts (V4's 144 is not 4k+1).
    saved = {n["inputs"]["frames"] for n in output.values() if isinstance(n["inputs"].get("frames"), int)}
    assert saved <= {49, 72, 144, 145} and saved, saved  # 145: the long-video workflow; 72: V3's
    version = workflow_version(output)
    if version in ("V4", "V2", "V3"):
        assert saved == {72 if version == "V3" else 144}, saved
    for node in output.values():  # the official augmentation strength survives the widget's rounding
        if node["class_type"] == "EasyAnimateImageToVideo":
            assert node["inputs"]["noise_aug_strength"] == 0.0563, node["inputs"]
    prompt = small_prompt(output, tiny_models, comfy_server.base_dir)
    frames = run_to_frames(comfy_server, prompt)
    expected_frames = SMALL_FRAMES[workflow_version(prompt)]
    assert frames.shape == (expected_frames, SMALL["height"], SMALL["width"], 3), frames.shape


NO_MICRO = "no micro workflows: the micro model's weights are not shipped yet (MODEL_CARD.md)"


@pytest.mark.parametrize(
    "path",
    MICRO_FILES or [pytest.param(None, marks=pytest.mark.skip(reason=NO_MICRO))],
    ids=lambda p: p.stem if p else "none",
)
def test_micro_workflow_runs_as_saved_on_the_bundled_weights_to_what_its_prompt_asks(comfy_server, page, path):
    output = load_and_convert(page, json.loads(path.read_text()))
    wanted = MICRO_PROMPTS[path.stem]
    texts = [n["inputs"]["text"] for n in output.values() if n["class_type"] == "EasyAnimateTextEncode"]
    assert wanted.caption in texts, texts
    frames = run_to_frames(comfy_server, output)
    size = (GENERATION_DEFAULTS["frames"], GENERATION_DEFAULTS["height"], GENERATION_DEFAULTS["width"], 3)
    assert frames.shape == size, frames.shape
    found = scoring.score(frames, wanted)
    assert found["colour_ok"] and found["direction_ok"], found
    assert found["one_object_share"] >= 0.9, found
