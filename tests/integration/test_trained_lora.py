"""A LoRA trained by `easyanimate train` loads in our ComfyUI LoRA node and reproduces core's merged model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from comfy_harness import FOLDERS_TO_TEMP, run_in_comfy_python
from PIL import Image

from easyanimate_core.cli import main
from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration

SCRIPT = (
    r"""
import importlib.util, json, sys
sys.argv = [sys.argv[0], "--cpu"]  # comfy.model_management parses ComfyUI's command line on import
sys.path[:0] = [COMFYUI_PATH]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import folder_paths
import types
# The pack adds an HTTP route to the running server on import; this script runs no server (and importing
# ComfyUI's server.py outside main.py fails), so a stand-in takes the registration.
routes = types.SimpleNamespace(get=lambda path: (lambda handler: handler))
prompt_server = types.SimpleNamespace(instance=types.SimpleNamespace(routes=routes))
sys.modules["server"] = types.SimpleNamespace(PromptServer=prompt_server)
"""
    + FOLDERS_TO_TEMP
    + r"""
# The pack imported as ComfyUI does: a package named by its folder, nodes imported relatively.
spec = importlib.util.spec_from_file_location("easyanimate_pack", REPO + "/__init__.py",
                                              submodule_search_locations=[REPO])
pack = importlib.util.module_from_spec(spec)
sys.modules["easyanimate_pack"] = pack
spec.loader.exec_module(pack)
from easyanimate_core.lora import merge_lora, read_lora
from easyanimate_pack.nodes.native_model import load_native_model
nodes = sys.modules["easyanimate_pack.nodes.loaders"]

folder_paths.add_model_folder_path("loras", LORA_DIR)
cpu = torch.device("cpu")
g = torch.Generator().manual_seed(0)
x, t, text = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([0.6]), torch.randn(1, 8, 32, generator=g)

def run(patcher):
    patcher.patch_model(device_to=cpu, lowvram_model_memory=0)
    with torch.no_grad():
        out = patcher.model.apply_model(x, t, c_crossattn=text)
    net = patcher.model.diffusion_model.transformer
    weights = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    patcher.unpatch_model(cpu)
    return out, weights

model = load_native_model(MODEL)
base_out, base_weights = run(model)
node_out, node_weights = run(nodes.EasyAnimateLoraLoader().apply(model, LORA_NAME, 1.0)[0])

core = load_native_model(MODEL)  # core's merge into a second copy, run through the same wrapper
transformer = core.model.diffusion_model.transformer
lora = read_lora(LORA_DIR + "/" + LORA_NAME, transformer)
merge_lora(transformer, lora)
core_out, core_weights = run(core)
print(json.dumps({
    "layers": len(lora),
    "linear_layers": len(base_weights),
    "weights_changed": sum(not torch.equal(node_weights[n], base_weights[n]) for n in base_weights),
    "weight_max_diff": max((node_weights[n] - core_weights[n]).abs().max().item() for n in core_weights),
    "output_max_diff": (node_out - core_out).abs().max().item(),
    "output_change": (node_out - base_out).abs().max().item(),
    "base_output_max_abs": base_out.abs().max().item(),
}))
"""
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny InP model and a LoRA trained on two PNG images by the CLI (a high learning rate: a visible LoRA)."""
    root = tmp_path_factory.mktemp("trained_lora")
    model = write_tiny_checkpoint(root / "model", "InP")
    data = root / "data"
    data.mkdir()
    entries = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.fromarray(np.full((32, 32, 3), colour, np.uint8)).save(data / f"{i}.png")
        entries.append({"file_path": f"{i}.png", "text": f"picture {i}", "type": "image"})
    (data / "metadata.json").write_text(json.dumps(entries))
    args = ["train", "--model", str(model), "--data", str(data / "metadata.json"), "--output", str(root / "out")]
    args += ["--resolutions", "32", "--max-steps", "6", "--rank", "4", "--alpha", "2", "--lr", "1e-2"]
    args += ["--name", "trained"]
    assert main(args) == 0
    return {"model": model, "lora_dir": root / "out", "lora_name": "trained.safetensors"}


def test_trained_lora_in_the_comfyui_node_equals_core_merge(trained):
    script = f"MODEL = {str(trained['model'])!r}\nLORA_DIR = {str(trained['lora_dir'])!r}\n"
    script += f"LORA_NAME = {trained['lora_name']!r}\n" + SCRIPT
    r = run_in_comfy_python(script, "COMFYUI_PATH is not set: no ComfyUI to load the trained LoRA in")
    assert r["layers"] == r["linear_layers"] == r["weights_changed"]  # every Linear layer trained and patched
    assert r["weight_max_diff"] <= 1e-6
    assert r["output_max_diff"] <= 1e-5 * max(1.0, r["base_output_max_abs"])
    assert r["output_change"] > 1e-3 * r["base_output_max_abs"]
