"""Our native MODEL and nodes in a real ComfyUI server: stock KSampler between our loader, encode and decode."""

from __future__ import annotations

import pytest
from comfy_harness import PACK_DIR_NAME, ComfyError

from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration

OUR_NODES = {
    "EasyAnimateModelLoader",
    "EasyAnimateVAELoader",
    "EasyAnimateVAEDecode",
    "EasyAnimateTextEncoderLoader",
    "EasyAnimateTextEncode",
    "EasyAnimateEmptyLatentVideo",
}
FOLDERS = {"V5.1": "tiny-v51-inp", "V5": "tiny-v5-inp"}


@pytest.fixture(scope="module")
def tiny_models(comfy_server):
    """Tiny random InP checkpoints (official layout) in the server's models/EasyAnimate/."""
    root = comfy_server.base_dir / "models" / "EasyAnimate"
    for version, name in FOLDERS.items():
        if not (root / name).is_dir():
            write_tiny_checkpoint(root / name, "InP", version=version)
    return FOLDERS


def text_to_video_prompt(folder: str, version: str, frames: int = 9, prefix: str = "easyanimate_t2v") -> dict:
    """API-format graph: our loaders, two text encodes, empty latent, stock KSampler, our decode, SaveImage."""
    return {
        "1": {"class_type": "EasyAnimateModelLoader", "inputs": {"model_folder": folder, "weight_dtype": "default"}},
        "2": {"class_type": "EasyAnimateTextEncoderLoader", "inputs": {"model_folder": folder}},
        "3": {"class_type": "EasyAnimateTextEncode", "inputs": {"text_encoder": ["2", 0], "text": "a red fox"}},
        "4": {"class_type": "EasyAnimateTextEncode", "inputs": {"text_encoder": ["2", 0], "text": "blurry"}},
        "5": {
            "class_type": "EasyAnimateEmptyLatentVideo",
            "inputs": {"version": version, "width": 64, "height": 32, "frames": frames, "batch_size": 1},
        },
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": 7,
                "steps": 3,
                "cfg": 6.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "EasyAnimateVAELoader", "inputs": {"model_folder": folder}},
        "8": {"class_type": "EasyAnimateVAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def test_object_info_lists_our_nodes_and_only_present_folders(comfy_server, tiny_models):
    info = comfy_server.get_json("/object_info")
    ours = {name for name, d in info.items() if d.get("python_module") == f"custom_nodes.{PACK_DIR_NAME}"}
    assert OUR_NODES <= ours, OUR_NODES - ours
    folders = info["EasyAnimateModelLoader"]["input"]["required"]["model_folder"][0]
    assert sorted(folders) == sorted(tiny_models.values())
    assert info["EasyAnimateModelLoader"]["output"] == ["MODEL", "STRING"]
    assert info["EasyAnimateVAEDecode"]["output"] == ["IMAGE"]
    assert info["EasyAnimateTextEncode"]["output"] == ["CONDITIONING"]


@pytest.mark.parametrize("version", ["V5.1", "V5"])
def test_text_to_video_with_stock_ksampler_saves_frames(comfy_server, tiny_models, version):
    prefix = f"easyanimate_t2v_{version.replace('.', '')}"
    entry = comfy_server.run_prompt(text_to_video_prompt(tiny_models[version], version, prefix=prefix), timeout=300)
    files = comfy_server.output_files(entry)
    assert len(files) == 9, entry["outputs"]  # 9 frames -> 3 latent frames -> 9 decoded frames
    assert all(f.is_file() and f.stat().st_size > 0 and f.name.startswith(prefix) for f in files)


def test_frames_not_4k_plus_1_are_rejected_with_nearest_values(comfy_server, tiny_models):
    with pytest.raises(ComfyError) as err:
        comfy_server.queue_prompt(text_to_video_prompt(tiny_models["V5.1"], "V5.1", frames=10))
    text = str(err.value.payload)
    assert "4k+1" in text and "9 or 13" in text, text[:2000]
