"""EasyAnimate Speed and the Model Loader's attention input in a real ComfyUI server, with the stock KSampler.

The bundled micro model (it ships its own step-cache polynomial): step caching and CFG skipping change the
latents a little and never break the run; compiled blocks give the eager latents; a missing attention package
runs sdpa and says so in the log.
"""

from __future__ import annotations

import uuid

import pytest
import torch
from safetensors.torch import load_file
from test_native_model import text_to_video_prompt
from workflow_specs import MICRO

pytestmark = pytest.mark.integration


def graph(prefix: str, speed: dict | None, attention: str = "sdpa") -> dict:
    """test_native_model's KSampler graph on the micro model at its own size, saving the latent; through EasyAnimate
    Speed (node 7) when ``speed`` is given."""
    nodes = text_to_video_prompt(MICRO, "V5.1", frames=17)
    nodes["1"]["inputs"]["attention"] = attention
    nodes["3"]["inputs"]["text"] = "a red circle moving right slowly on a navy background"
    nodes["4"]["inputs"]["text"] = ""
    nodes["5"]["inputs"].update(width=64, height=64)
    nodes["6"]["inputs"].update(seed=3, steps=12, model=["7", 0] if speed else ["1", 0])
    for key in ("7", "8", "9"):  # the decode and image output
        del nodes[key]
    nodes["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{prefix}"}}
    if speed:
        settings = {"step_cache": 0.0, "cfg_skip": 0.0, "cfg_skip_at": "end", "compile": False, **speed}
        nodes["7"] = {"class_type": "EasyAnimateSpeed", "inputs": {"model": ["1", 0], **settings}}
    return nodes


def latent(server, speed: dict | None, attention: str = "sdpa") -> torch.Tensor:
    prefix = uuid.uuid4().hex[:8]
    files = server.output_files(server.run_prompt(graph(prefix, speed, attention), timeout=900))
    [file] = [f for f in files if f.name.startswith(prefix)]
    return load_file(file)["latent_tensor"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_speed_node_with_the_stock_ksampler(comfy_server):
    plain = latent(comfy_server, None)
    cached = latent(comfy_server, {"step_cache": 0.1})
    skipped = latent(comfy_server, {"cfg_skip": 0.25})
    assert plain.shape == (1, 16, 5, 8, 8) and plain.abs().max() > 0.1
    for name, other in (("step cache", cached), ("CFG skip", skipped)):
        assert not torch.equal(other, plain), f"{name} changed nothing: it did not run"
        assert relative(other, plain) < 0.5, f"{name}: {relative(other, plain):.3f} from the full run"
    compiled = latent(comfy_server, {"compile": True})
    torch.testing.assert_close(compiled, plain, rtol=1e-3, atol=1e-3)


def test_a_missing_attention_package_runs_sdpa_and_says_so(comfy_server):
    since = len(comfy_server.log_text())
    plain = latent(comfy_server, None)
    assert torch.equal(latent(comfy_server, None, attention="sage"), plain)
    assert "attention: sage is not installed" in comfy_server.log_text()[since:]


def test_a_quantized_gguf_transformer_runs_with_the_stock_ksampler(comfy_server):
    """The micro transformer written as Q8_0 by easyanimate quantize: as a model folder's transformer/model.gguf
    (beside the micro VAE and text encoder) it is sampled by KSampler close to the float model's latents; as a
    single file in models/diffusion_models/ the Model Loader lists it."""
    pytest.importorskip("gguf", reason="GGUF files need the gguf package (pip install gguf)")
    from easyanimate_core.cli import main
    from easyanimate_core.micro import shipped_micro_model

    micro, models = shipped_micro_model(), comfy_server.base_dir / "models"
    folder = models / "EasyAnimate" / "micro-q8"
    single = models / "diffusion_models" / "easyanimate-micro-q8.gguf"
    if not folder.exists():
        (folder / "transformer").mkdir(parents=True)
        for part in ("vae", "text_encoder", "tokenizer"):
            (folder / part).symlink_to(micro / part, target_is_directory=True)
        assert main(["quantize", str(micro), str(folder / "transformer" / "model.gguf"), "--type", "Q8_0"]) == 0
        single.parent.mkdir(parents=True, exist_ok=True)
        single.symlink_to(folder / "transformer" / "model.gguf")
    listed = comfy_server.get_json("/object_info/EasyAnimateModelLoader")["EasyAnimateModelLoader"]
    choices = listed["input"]["required"]["model_folder"][0]
    assert "micro-q8" in choices and single.name in choices
    plain = latent(comfy_server, None)
    prefix = uuid.uuid4().hex[:8]
    quantized_graph = graph(prefix, None)
    quantized_graph["1"]["inputs"]["model_folder"] = "micro-q8"
    files = comfy_server.output_files(comfy_server.run_prompt(quantized_graph, timeout=900))
    [file] = [f for f in files if f.name.startswith(prefix)]
    quantized = load_file(file)["latent_tensor"]
    assert not torch.equal(quantized, plain) and relative(quantized, plain) < 0.1, relative(quantized, plain)
