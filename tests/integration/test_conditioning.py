"""Conditioning nodes and EasyAnimate Sampler in a real ComfyUI server, on tiny random checkpoints.

Graphs go through /prompt to a saved video (stock LoadImage / LoadVideo + GetVideoComponents in, CreateVideo +
SaveVideo out); latents are compared through stock SaveLatent files; bad inputs must be refused with messages
that name the fix, and the server must stay up.
"""

from __future__ import annotations

import shutil
import uuid

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from comfy_harness import FOLDERS_TO_TEMP, ComfyError
from PIL import Image
from safetensors.torch import load_file, save_file
from test_native_model import FOLDERS

from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration

INP, CONTROL = FOLDERS["V5.1"], "tiny-v51-control"
W, H, FRAMES = 64, 32, 5  # 2 latent frames of 8 x 4


@pytest.fixture(scope="module")
def setup(comfy_server):
    """Tiny V5.1 InP and Control checkpoints, and input images and a video in the server's input/ folder."""
    models = comfy_server.base_dir / "models" / "EasyAnimate"
    for name, variant in ((INP, "InP"), (CONTROL, "Control")):
        if not (models / name).is_dir():
            write_tiny_checkpoint(models / name, variant, version="V5.1")
    inputs = comfy_server.base_dir / "input"
    inputs.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("start.png", "end.png", "ref.png"):
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(inputs / name)
    clip = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(9)]
    imageio.mimwrite(inputs / "source.mp4", clip, fps=8)
    return comfy_server


def base_graph(folder: str = INP) -> dict:
    """Loaders, prompt encodes and the output chain (decode -> CreateVideo -> SaveVideo) of every graph."""
    return {
        "1": {"class_type": "EasyAnimateModelLoader", "inputs": {"model_folder": folder, "weight_dtype": "default"}},
        "2": {"class_type": "EasyAnimateTextEncoderLoader", "inputs": {"model_folder": folder}},
        "3": {"class_type": "EasyAnimateTextEncode", "inputs": {"text_encoder": ["2", 0], "text": "a red fox"}},
        "4": {"class_type": "EasyAnimateTextEncode", "inputs": {"text_encoder": ["2", 0], "text": "blurry"}},
        "5": {"class_type": "EasyAnimateVAELoader", "inputs": {"model_folder": folder}},
        "20": {"class_type": "EasyAnimateVAEDecode", "inputs": {"samples": ["10", 0], "vae": ["5", 0]}},
        "21": {"class_type": "CreateVideo", "inputs": {"images": ["20", 0], "fps": 8.0}},
        "22": {
            "class_type": "SaveVideo",
            "inputs": {"video": ["21", 0], "filename_prefix": "easyanimate_cond", "format": "mp4", "codec": "h264"},
        },
    }


def conditioning_node(class_type: str, **inputs) -> dict:
    size = {"width": W, "height": H, "frames": FRAMES, "batch_size": 1}
    return {
        "class_type": class_type,
        "inputs": {"positive": ["3", 0], "negative": ["4", 0], "vae": ["5", 0], **size, **inputs},
    }


def our_sampler(cond: str = "6", model: str = "1", **settings) -> dict:
    inputs = {
        "model": [model, 0],
        "positive": [cond, 0],
        "negative": [cond, 1],
        "latent": [cond, 2],
        "seed": 5,
        "steps": 3,
        "cfg": 6.0,
        "sampler_name": "default",
        "scheduler": "default",
        "denoise": 1.0,
        "shift": 0.0,
    }
    inputs.update(settings)
    return {"class_type": "EasyAnimateSampler", "inputs": inputs}


def load_image(name: str) -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def video_frames() -> dict:
    """Nodes 30 / 31: the input video as IMAGE frames (stock LoadVideo + GetVideoComponents)."""
    return {
        "30": {"class_type": "LoadVideo", "inputs": {"file": "source.mp4"}},
        "31": {"class_type": "GetVideoComponents", "inputs": {"video": ["30", 0]}},
    }


def saved_video_frames(server, entry) -> int:
    [video] = [f for f in server.output_files(entry) if f.suffix == ".mp4"]
    assert video.stat().st_size > 0
    return len(imageio.mimread(video, memtest=False))


def test_image_to_video_with_start_and_end_images_saves_a_video(setup):
    graph = base_graph()
    graph.update(
        {
            "7": load_image("start.png"),
            "8": load_image("end.png"),
            "6": conditioning_node(
                "EasyAnimateImageToVideo", noise_aug_strength=0.0563, start_image=["7", 0], end_image=["8", 0]
            ),
            "10": our_sampler(),
        }
    )
    assert saved_video_frames(setup, setup.run_prompt(graph, timeout=300)) == FRAMES


def test_video_to_video_saves_a_video(setup):
    graph = {**base_graph(), **video_frames()}
    graph.update(
        {
            "6": conditioning_node("EasyAnimateVideoToVideo", video=["31", 0]),
            "10": our_sampler(denoise=0.7),  # the official default strength: 2 of the 3 steps run
        }
    )
    assert saved_video_frames(setup, setup.run_prompt(graph, timeout=300)) == FRAMES


def test_control_video_with_reference_image_saves_a_video(setup):
    graph = {**base_graph(CONTROL), **video_frames()}
    graph.update(
        {
            "7": load_image("ref.png"),
            "6": conditioning_node("EasyAnimateControlVideo", video=["31", 0], ref_image=["7", 0]),
            "10": our_sampler(),
        }
    )
    assert saved_video_frames(setup, setup.run_prompt(graph, timeout=300)) == FRAMES


def save_latent(source: str, prefix: str) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": [source, 0], "filename_prefix": f"latents/{prefix}"}}


def test_stock_ksampler_and_sampler_custom_advanced_give_our_sampler_nodes_latents(setup):
    """Same conditioning (start image through an InP model), seed, steps and cfg:
    - EasyAnimate Sampler with euler / simple against the stock KSampler with euler / simple;
    - EasyAnimate Sampler with its defaults against SamplerCustomAdvanced with euler + EasyAnimate Flow Sigmas.
    Both pairs run the same ComfyUI sampling code on the same noise (prepare_noise of the seed), so the latents
    must be equal bit for bit."""
    prefix = uuid.uuid4().hex[:8]
    graph = {k: v for k, v in base_graph().items() if k not in ("20", "21", "22")}
    graph.update(
        {
            "7": load_image("start.png"),
            "6": conditioning_node("EasyAnimateImageToVideo", noise_aug_strength=0.0563, start_image=["7", 0]),
            "10": our_sampler(sampler_name="euler", scheduler="simple"),
            "11": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["1", 0],
                    "seed": 5,
                    "steps": 3,
                    "cfg": 6.0,
                    "sampler_name": "euler",
                    "scheduler": "simple",
                    "positive": ["6", 0],
                    "negative": ["6", 1],
                    "latent_image": ["6", 2],
                    "denoise": 1.0,
                },
            },
            "12": our_sampler(),
            "13": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
            "14": {
                "class_type": "CFGGuider",
                "inputs": {"model": ["1", 0], "positive": ["6", 0], "negative": ["6", 1], "cfg": 6.0},
            },
            "15": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "16": {"class_type": "EasyAnimateFlowSigmas", "inputs": {"steps": 3, "denoise": 1.0}},
            "17": {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": ["13", 0],
                    "guider": ["14", 0],
                    "sampler": ["15", 0],
                    "sigmas": ["16", 0],
                    "latent_image": ["6", 2],
                },
            },
            "40": save_latent("10", f"{prefix}_ours_simple"),
            "41": save_latent("11", f"{prefix}_ksampler"),
            "42": save_latent("12", f"{prefix}_ours_default"),
            "43": save_latent("17", f"{prefix}_custom"),
        }
    )
    files = setup.output_files(setup.run_prompt(graph, timeout=300))
    # SaveLatent names files <prefix>_<n>_.latent
    latents = {f.name[len(prefix) + 1 :].rsplit("_", 2)[0]: load_file(f)["latent_tensor"] for f in files}
    assert set(latents) == {"ours_simple", "ksampler", "ours_default", "custom"}, sorted(latents)
    ours, stock = latents["ours_simple"], latents["ksampler"]
    assert ours.shape == (1, 16, 2, 4, 8) and ours.abs().max() > 0.1
    assert torch.equal(ours, stock)
    assert torch.equal(latents["ours_default"], latents["custom"])
    assert not torch.equal(ours, latents["ours_default"])  # simple and the released schedule differ


def refused(server, graph) -> str:
    with pytest.raises(ComfyError) as err:
        server.queue_prompt(graph)
    return str(err.value.payload)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"frames": 10}, "frames 10 must be 4k+1 for V5.1; nearest valid: 9 or 13"),
        ({"width": 100}, "width 100 is not a multiple of 16; nearest valid: 96 or 112"),
    ],
)
def test_bad_frames_and_sizes_are_refused_at_validation(setup, change, expected):
    graph = base_graph()
    graph.update(
        {
            "7": load_image("start.png"),
            "6": conditioning_node("EasyAnimateImageToVideo", noise_aug_strength=0.0, start_image=["7", 0]),
            "10": our_sampler(),
        }
    )
    graph["6"]["inputs"].update(change)
    assert expected in refused(setup, graph)


def test_a_checkpoint_of_another_family_in_diffusion_models_is_refused_at_validation(setup):
    folder = setup.base_dir / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    # The two tensors ComfyUI's own detection reads to recognise an LTX-Video transformer.
    ltxv = {
        "adaln_single.emb.timestep_embedder.linear_1.bias": torch.zeros(64),
        "transformer_blocks.0.attn2.to_k.weight": torch.zeros(64, 32),
    }
    save_file(ltxv, folder / "ltxv_tiny.safetensors")
    graph = base_graph()
    graph["1"]["inputs"]["model_folder"] = "ltxv_tiny.safetensors"
    graph.update(
        {
            "7": load_image("start.png"),
            "6": conditioning_node("EasyAnimateImageToVideo", noise_aug_strength=0.0, start_image=["7", 0]),
            "10": our_sampler(),
        }
    )
    message = refused(setup, graph)
    assert "diffusion_models/ltxv_tiny.safetensors is a LTXV checkpoint, not EasyAnimate; use ComfyUI's UNETLoader" in (
        message
    )


@pytest.mark.parametrize("sampler", ["EasyAnimateSampler", "KSampler"])
def test_control_video_for_an_inp_model_fails_before_any_step_and_the_server_stays_up(setup, sampler):
    graph = {**base_graph(INP), **video_frames()}
    graph["6"] = conditioning_node("EasyAnimateControlVideo", video=["31", 0])
    graph["10"] = our_sampler(seed=11)
    if sampler == "KSampler":
        graph["10"] = {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": 11,
                "steps": 3,
                "cfg": 6.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["6", 0],
                "negative": ["6", 1],
                "latent_image": ["6", 2],
                "denoise": 1.0,
            },
        }
    client_id = uuid.uuid4().hex
    events = setup.events(client_id)
    try:
        prompt_id = setup.queue_prompt(graph, client_id=client_id)
        sampler_steps, error = [], None
        while error is None:
            event = events.next_event()
            data = event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if event["type"] == "progress" and data.get("node") == "10":
                sampler_steps.append(data["value"])
            elif event["type"] == "execution_error":
                error = data
            elif event["type"] == "execution_success":
                pytest.fail("a control video on an InP model was sampled")
    finally:
        events.close()
    assert error["node_id"] == "10" and sampler_steps == []
    assert (
        "need an EasyAnimate Control model, but this model is InP: load a -Control checkpoint"
        in (error["exception_message"])
    )
    assert setup.process.poll() is None and "EasyAnimateSampler" in setup.get_json("/object_info/EasyAnimateSampler")


V5_DEFAULTS_SCRIPT = (
    r"""
import importlib.util, json, sys, tempfile
sys.argv = [sys.argv[0], "--cpu"]
sys.path[:0] = [COMFYUI_PATH]
import comfy.options
comfy.options.enable_args_parsing()
import types
import utils.install_util  # as main.py: ComfyUI's utils package first (its nodes.py puts comfy/utils.py on the path)
import server
from aiohttp import web
server.PromptServer.instance = types.SimpleNamespace(routes=web.RouteTableDef())  # the pack adds a route on import
import torch
sys.path.insert(0, REPO)
from tests.tiny_checkpoint import write_tiny_checkpoint
sys.path.remove(REPO)
"""
    + FOLDERS_TO_TEMP
    + r"""
spec = importlib.util.spec_from_file_location("easyanimate_pack", REPO + "/__init__.py",
                                              submodule_search_locations=[REPO])
pack = importlib.util.module_from_spec(spec)
sys.modules["easyanimate_pack"] = pack
spec.loader.exec_module(pack)
from easyanimate_core.loading import load_transformer
from easyanimate_core.pipeline import denoise
from easyanimate_core.sampling import make_sampler
from easyanimate_core.text_encoders import PromptPair, load_text_encoders
from easyanimate_pack.nodes.native_model import load_native_model
loaders = sys.modules["easyanimate_pack.nodes.loaders"]
sampler_node = sys.modules["easyanimate_pack.nodes.sampler"].EasyAnimateSampler()

STEPS, GUIDANCE, SEED, SHAPE = 10, 6.0, 4, (1, 16, 2, 4, 8)
root = tempfile.mkdtemp() + "/tiny_v5"
write_tiny_checkpoint(root, "T2V", version="V5")
model = load_native_model(root)
te = loaders.EasyAnimateTextEncoderHandle(load_text_encoders(root, "v5"))
encode = loaders.EasyAnimateTextEncode().encode
positive, negative = encode(te, "a red fox")[0], encode(te, "blurry")[0]
(out,) = sampler_node.sample(model, positive, negative, {"samples": torch.zeros(SHAPE)}, SEED, STEPS, GUIDANCE,
                             "default", "default", 1.0, 0.0)
ours = out["samples"] * model.model.latent_format.scale_factor  # LATENT is VAE space; core's is model space

noise = torch.randn(SHAPE, generator=torch.manual_seed(SEED))  # ComfyUI's prepare_noise for the seed
transformer = load_transformer(root)
prompts = PromptPair(te.encoders.encode_texts(["a red fox"]), te.encoders.encode_texts(["blurry"]))
with torch.no_grad():
    core = denoise(transformer, noise, make_sampler("DDIM", "V5", STEPS), prompts, GUIDANCE, {}, torch.Generator())
print(json.dumps({"max_abs": core.abs().max().item(), "max_diff": (ours - core).abs().max().item()}))
"""
)


def test_v5_defaults_reproduce_the_core_ddim_pipeline():
    """EasyAnimate Sampler's V5 defaults (ComfyUI's ddim on the released trailing timesteps) against core's DDIM
    loop (the official scheduler's steps) for the same noise: they differ only where ComfyUI replaces the zero
    terminal SNR's infinite first sigma by a finite 4.5e3 (x0 = -v + x / sigma^2 instead of -v) and in rounding:
    measured 1e-4 of the latents' scale after 10 steps; bound 1e-3."""
    from comfy_harness import run_in_comfy_python

    r = run_in_comfy_python(V5_DEFAULTS_SCRIPT, "COMFYUI_PATH is not set: no ComfyUI checkout to sample with")
    assert r["max_abs"] > 0.1
    assert r["max_diff"] <= 1e-3 * r["max_abs"], r


def test_single_files_in_comfys_standard_folders_load_and_sample(setup):
    """A transformer file in diffusion_models/ and a single-file Qwen2-VL in text_encoders/ (config and tokenizer
    in the folder of the same name beside it) are offered by the loaders and run a text-to-video graph."""
    source = setup.base_dir / "models" / "EasyAnimate" / INP
    models = setup.base_dir / "models"
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (models / "text_encoders").mkdir(parents=True, exist_ok=True)
    shutil.copy(
        source / "transformer" / "diffusion_pytorch_model.safetensors",
        models / "diffusion_models" / "easyanimate_tiny.safetensors",
    )
    shutil.copy(source / "text_encoder" / "model.safetensors", models / "text_encoders" / "qwen2vl_tiny.safetensors")
    parts = models / "text_encoders" / "qwen2vl_tiny"
    if not parts.is_dir():
        shutil.copytree(source / "tokenizer", parts)
        shutil.copy(source / "text_encoder" / "config.json", parts / "config.json")
    info = setup.get_json("/object_info/EasyAnimateModelLoader")["EasyAnimateModelLoader"]
    assert "easyanimate_tiny.safetensors" in info["input"]["required"]["model_folder"][0]
    info = setup.get_json("/object_info/EasyAnimateTextEncoderLoader")["EasyAnimateTextEncoderLoader"]
    assert "qwen2vl_tiny.safetensors" in info["input"]["required"]["model_folder"][0]
    graph = base_graph()
    graph["1"]["inputs"]["model_folder"] = "easyanimate_tiny.safetensors"
    graph["2"]["inputs"]["model_folder"] = "qwen2vl_tiny.safetensors"
    graph["6"] = {
        "class_type": "EasyAnimateEmptyLatentVideo",
        "inputs": {"version": "V5.1", "width": W, "height": H, "frames": FRAMES, "batch_size": 1},
    }
    graph["10"] = our_sampler(seed=21)
    graph["10"]["inputs"].update(positive=["3", 0], negative=["4", 0], latent=["6", 0])
    assert saved_video_frames(setup, setup.run_prompt(graph, timeout=300)) == FRAMES
