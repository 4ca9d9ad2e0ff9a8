"""What ComfyUI-Manager and the Comfy Registry read: pyproject.toml, requirements.txt, the icon, the web folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def requirement_lines() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_registry_metadata_is_complete():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert project["name"] == project["name"].lower() and project["version"]
    assert project["license"] and project["description"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert comfy.get(key), key
    SpecifierSet(comfy["requires-comfyui"])  # a valid version range
    frontend = [Requirement(d) for d in project["dependencies"] if d.startswith("comfyui-frontend-package")]
    assert len(frontend) == 1 and str(frontend[0].specifier)
    assert comfy["Icon"].endswith("/web/icon.png") and (REPO / "web" / "icon.png").is_file()


def test_requirements_install_line_by_line_without_touching_torch():
    # ComfyUI-Manager runs `pip install <line>` for each line: each must be a requirement on its own.
    names = {Requirement(line).name.lower() for line in requirement_lines()}
    assert not names & TORCH_FAMILY
    assert "comfyui-frontend-package" not in names  # ComfyUI pins its own frontend
    runtime = {Requirement(d).name.lower() for d in PYPROJECT["project"]["dependencies"]}
    assert names == runtime - {"comfyui-frontend-package"}  # one list of runtime packages, in two files


def test_diffusers_is_only_a_test_dependency():
    runtime = {Requirement(d).name.lower() for d in PYPROJECT["project"]["dependencies"]}
    assert "diffusers" not in runtime
    assert any(Requirement(d).name == "diffusers" for d in PYPROJECT["project"]["optional-dependencies"]["test"])
    imports_diffusers = re.compile(r"^\s*(import|from)\s+diffusers\b", re.MULTILINE)
    for path in [*REPO.glob("easyanimate_core/**/*.py"), *REPO.glob("nodes/**/*.py")]:
        assert not imports_diffusers.search(path.read_text()), f"{path} imports diffusers at run time"


def test_web_directory_holds_only_the_frontend_extension():
    # ComfyUI serves every .js file under WEB_DIRECTORY and the frontend imports each at start.
    assert sorted(p.relative_to(REPO / "web").as_posix() for p in (REPO / "web").rglob("*.js")) == ["js/easyanimate.js"]


def test_comfy_node_validate_passes():
    beside_python = Path(sys.executable).parent / "comfy"  # the test venv's own comfy-cli (the `test` extra)
    comfy = os.environ.get("COMFY_CLI") or (str(beside_python) if beside_python.is_file() else shutil.which("comfy"))
    if comfy is None:
        pytest.skip("comfy-cli is not installed (pip install comfy-cli, or set COMFY_CLI to its `comfy`)")
    result = subprocess.run(
        [comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Security warnings found" not in result.stdout, result.stdout  # announced to become errors


def _null_paths(value, path: str = "") -> list[str]:
    if value is None:
        return [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [
        p
        for key, item in items
        for p in _null_paths(item, f"{path}.{key}" if isinstance(value, dict) else f"{path}[{key}]")
    ]


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_bundled_workflows_hold_no_null(path):
    """The frontend's workflow schema (validation on by default) refuses null for floatingLinks, extra.reroutes,
    definitions, outputs[].slot_index ...: a file holding one opens with an "Invalid workflow" alert."""
    assert _null_paths(json.loads(path.read_text())) == []


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_every_image_and_video_a_workflow_loads_is_shipped(path):
    """LoadImage / LoadVideo read ComfyUI's input folder, where the pack copies workflows/inputs/ at start."""
    media = {"LoadImage": 0, "LoadVideo": 0}  # the file name is the node's first widget value
    names = [n["widgets_values"][media[n["type"]]] for n in json.loads(path.read_text())["nodes"] if n["type"] in media]
    assert [name for name in names if not (REPO / "workflows" / "inputs" / name).is_file()] == []


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_every_workflow_has_a_thumbnail_that_is_not_blank(path):
    """The template browser shows workflows/<name>.jpg: 640 x 400, with text and boxes drawn (bright pixels; an
    empty canvas grid has none)."""
    from PIL import Image

    image = Image.open(path.with_suffix(".jpg")).convert("L")
    assert image.size == (640, 400)
    bright = sum(image.histogram()[200:]) / (image.size[0] * image.size[1])
    assert bright > 0.01, f"{path.with_suffix('.jpg').name}: {bright:.2%} bright pixels"
