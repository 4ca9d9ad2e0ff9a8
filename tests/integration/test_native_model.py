"""Our native MODEL and nodes in a real ComfyUI server: stock KSampler between our loader, encode and decode."""

from __future__ import annotations

import math

import pytest
from comfy_harness import PACK_DIR_NAME, PACK_IMPORT_SCRIPT, ComfyError, run_in_comfy_python
from workflow_specs import MICRO

from easyanimate_core.micro import shipped_micro_model
from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration


OUR_NODES = {
    "EasyAnimateModelLoader",
    "EasyAnimateVAELoader",
    "EasyAnimateVAEDecode",
    "EasyAnimateTextEncoderLoader",
    "EasyAnimateTextEncode",
    "EasyAnimateEmptyLatentVideo",
    "EasyAnimateFlowSigmas",
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
    # Other test modules share the server and add their own checkpoints: every entry must exist, ours included.
    assert set(tiny_models.values()) <= set(folders)
    models = comfy_server.base_dir / "models"
    bundled = shipped_micro_model()
    for name in folders:
        if name == MICRO:  # the pack's own model, listed from inside the pack
            assert bundled is not None and (bundled / "transformer").is_dir()
            continue
        path = models / "diffusion_models" / name if name.endswith(".safetensors") else models / "EasyAnimate" / name
        assert (path / "transformer").is_dir() or path.is_file(), name
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


def test_model_sampling_sd3_shift_patch_works_with_ksampler(comfy_server, tiny_models):
    prompt = text_to_video_prompt(tiny_models["V5.1"], "V5.1", frames=5, prefix="easyanimate_sd3_shift")
    prompt["10"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 5.0}}
    prompt["6"]["inputs"]["model"] = ["10", 0]
    files = comfy_server.output_files(comfy_server.run_prompt(prompt, timeout=300))
    assert len(files) == 5 and all(f.stat().st_size > 0 for f in files)


def test_sampler_custom_advanced_with_flow_sigmas_saves_an_animated_webp(comfy_server, tiny_models):
    prompt = text_to_video_prompt(tiny_models["V5.1"], "V5.1", frames=9)
    del prompt["6"], prompt["9"]
    prompt.update(
        {
            "20": {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}},
            "21": {
                "class_type": "CFGGuider",
                "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "cfg": 6.0},
            },
            "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "23": {"class_type": "EasyAnimateFlowSigmas", "inputs": {"steps": 4, "denoise": 1.0}},
            "24": {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": ["20", 0],
                    "guider": ["21", 0],
                    "sampler": ["22", 0],
                    "sigmas": ["23", 0],
                    "latent_image": ["5", 0],
                },
            },
            "25": {
                "class_type": "SaveAnimatedWEBP",
                "inputs": {
                    "images": ["8", 0],
                    "filename_prefix": "easyanimate_custom",
                    "fps": 8.0,
                    "lossless": False,
                    "quality": 80,
                    "method": "default",
                },
            },
        }
    )
    prompt["8"]["inputs"]["samples"] = ["24", 0]
    files = comfy_server.output_files(comfy_server.run_prompt(prompt, timeout=300))
    assert len(files) == 1 and files[0].suffix == ".webp"
    data = files[0].read_bytes()
    # An animated WebP: an ANIM chunk and several ANMF frame chunks (libwebp merges identical neighbours,
    # so the count may be below the 9 decoded frames).
    assert data[:4] == b"RIFF" and b"ANIM" in data and data.count(b"ANMF") >= 2


def test_frames_not_4k_plus_1_are_rejected_with_nearest_values(comfy_server, tiny_models):
    with pytest.raises(ComfyError) as err:
        comfy_server.queue_prompt(text_to_video_prompt(tiny_models["V5.1"], "V5.1", frames=10))
    text = str(err.value.payload)
    assert "4k+1" in text and "9 or 13" in text, text[:2000]


SAMPLING_SCRIPT = (
    PACK_IMPORT_SCRIPT
    + r"""
from easyanimate_core.loading import load_transformer
from easyanimate_core.pipeline import denoise
from easyanimate_core.sampling import SCHEDULES, alphas_cumprod, flow_sigmas, make_sampler
from easyanimate_core.text_encoders import PromptPair, load_text_encoders

from easyanimate_pack.nodes.native_model import load_native_model
nodes = sys.modules["easyanimate_pack.nodes.loaders"]

STEPS, GUIDANCE, SHAPE = 6, 6.0, (1, 16, 3, 4, 8)
root = tempfile.mkdtemp() + "/tiny"
write_tiny_checkpoint(root, "InP", version="V5.1")
model = load_native_model(root)
te = nodes.EasyAnimateTextEncoderHandle(load_text_encoders(root, "v5.1"))
encode = nodes.EasyAnimateTextEncode().encode
positive, negative = encode(te, "a red fox")[0], encode(te, "blurry")[0]
noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))

# ComfyUI: its Euler sampler on our MODEL, with the core V5.1 schedule as custom sigmas.
sigmas = flow_sigmas(STEPS)
comfy_latents = comfy.sample.sample_custom(model, noise, GUIDANCE, comfy.samplers.sampler_object("euler"), sigmas,
                                           positive, negative, torch.zeros(SHAPE), disable_pbar=True, seed=3)
comfy_latents = comfy_latents * model.model.latent_format.scale_factor  # LATENT is VAE space; ours is model space

# A LoRA-style weight diff on a clone (as LoraLoader does), then the unpatched original again.
def comfy_sample(m):
    out = comfy.sample.sample_custom(m, noise, GUIDANCE, comfy.samplers.sampler_object("euler"), sigmas,
                                     positive, negative, torch.zeros(SHAPE), disable_pbar=True, seed=3)
    return out * m.model.latent_format.scale_factor

key = "diffusion_model.transformer.proj_out.weight"
weight = model.model.state_dict()[key]
patched = model.clone()
patched.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.05,)})
patched_latents = comfy_sample(patched)
restored_latents = comfy_sample(model)

# A forced partial load (1-byte weight budget: every comfy.ops layer streams its weights) against a full load.
x, t = noise * 0.5, torch.tensor([0.7])
def apply(m):
    with torch.no_grad():
        return m.model.apply_model(x, t, c_crossattn=positive[0][0])
cpu = torch.device("cpu")
model.patch_model(device_to=cpu, lowvram_model_memory=0)
full_out = apply(model)
model.unpatch_model(cpu)
model.patch_model(device_to=cpu, lowvram_model_memory=1)
streamed = sum(bool(getattr(m, "comfy_cast_weights", False)) for m in model.model.modules())
lowvram = bool(model.model.model_lowvram)
partial_out = apply(model)
model.unpatch_model(cpu)

# Our LoRA node (official-layout file in a loras/ folder): ComfyUI's patched weights equal core's merge.
import folder_paths
from safetensors.torch import save_file
from easyanimate_core.lora import merge_lora, read_lora
net = model.model.diffusion_model.transformer
lora_paths = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_out.0", "proj_out"]
g, lora_sd = torch.Generator().manual_seed(9), {}
for path in lora_paths:
    w, name = net.get_submodule(path).weight, "lora_unet__" + path.replace(".", "_")
    lora_sd[name + ".lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.1
    lora_sd[name + ".lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.1
    lora_sd[name + ".alpha"] = torch.tensor(2.0)
lora_dir = tempfile.mkdtemp()
save_file(lora_sd, lora_dir + "/tiny_lora.safetensors")
folder_paths.add_model_folder_path("loras", lora_dir)
with_lora = nodes.EasyAnimateLoraLoader().apply(model, "tiny_lora.safetensors", 0.8)[0]
base_out = apply(model)
with_lora.patch_model(device_to=cpu, lowvram_model_memory=0)
lora_out = apply(with_lora)
patched_weights = {p: net.get_submodule(p).weight.detach().clone() for p in lora_paths}
with_lora.unpatch_model(cpu)
merged = load_transformer(root)
merge_lora(merged, read_lora(lora_dir + "/tiny_lora.safetensors", merged), 0.8)
lora_weight_diff = max((patched_weights[p] - merged.get_submodule(p).weight).abs().max().item() for p in lora_paths)
lora_change = (lora_out - base_out).abs().max().item()
unpatched_diff = (apply(model) - base_out).abs().max().item()

# ComfyUI's stock LoraLoaderModelOnly on the same LoRA in each EasyAnimate layout: it cannot map their key names,
# and our MODEL refuses the empty patch set it then passes (the run would otherwise succeed without the LoRA).
import nodes as comfy_nodes
from easyanimate_core.lora import lora_state_dict
stock_lora = {}
for layout in ("official", "peft", "diffusers"):
    save_file(lora_state_dict(read_lora(lora_dir + "/tiny_lora.safetensors", net), layout),
              f"{lora_dir}/tiny_{layout}.safetensors")
    try:
        comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, f"tiny_{layout}.safetensors", 0.8)
        stock_lora[layout] = "applied without an error"
    except ValueError as error:
        stock_lora[layout] = str(error)

# Core: the pipeline's sampling loop with the Flow sampler, on a transformer loaded without comfy.ops.
transformer = load_transformer(root)
prompts = PromptPair(te.encoders.encode_texts(["a red fox"]), te.encoders.encode_texts(["blurry"]))
inpaint = {"inpaint_latents": torch.zeros(1, 17, *SHAPE[2:])}
with torch.no_grad():
    core_latents = denoise(transformer, noise.clone(), make_sampler("Flow", "V5.1", STEPS), prompts, GUIDANCE,
                           inpaint, torch.Generator().manual_seed(0))

# V5: ComfyUI's discrete v-prediction table with zero terminal SNR against core's alphas_cumprod.
root_v5 = tempfile.mkdtemp() + "/tiny_v5"
write_tiny_checkpoint(root_v5, "T2V", version="V5")
ms_v5 = load_native_model(root_v5).get_model_object("model_sampling")
abar = alphas_cumprod(SCHEDULES["V5"])
core_sigmas = ((1 - abar) / abar).sqrt()[:-1]  # the last is infinite (ComfyUI clamps it to a finite value)

ms = model.get_model_object("model_sampling")
raw = torch.linspace(1000, 1, STEPS) / 1000  # not the schedule's points: any t checks the shift formula
core_shift = torch.e * raw / (1 + (torch.e - 1) * raw)
print(json.dumps({
    "shift": float(ms.shift),
    "sigma_formula_max_diff": (ms.sigma(raw * 1000) - core_shift).abs().max().item(),
    "timestep_of_sigma": ms.timestep(torch.tensor(0.5)).item(),
    "latent_max_abs": core_latents.abs().max().item(),
    "latent_max_diff": (comfy_latents - core_latents).abs().max().item(),
    "patched_max_diff": (patched_latents - comfy_latents).abs().max().item(),
    "restored_max_diff": (restored_latents - comfy_latents).abs().max().item(),
    "partial_lowvram": lowvram,
    "partial_streamed_layers": streamed,
    "partial_max_diff": (partial_out - full_out).abs().max().item(),
    "lora_weight_max_diff": lora_weight_diff,
    "lora_output_change": lora_change,
    "lora_unpatched_diff": unpatched_diff,
    "stock_lora": stock_lora,
    "base_output_max_abs": base_out.abs().max().item(),
    "v5_sampling_classes": [c.__name__ for c in type(ms_v5).__mro__],
    "v5_sigma_max_rel_diff": ((ms_v5.sigmas[:-1] - core_sigmas).abs() / core_sigmas).max().item(),
    "v5_sigma_max": ms_v5.sigmas[-1].item(),
}))
"""
)


@pytest.fixture(scope="module")
def flow_sampling_results():
    return run_in_comfy_python(SAMPLING_SCRIPT, "COMFYUI_PATH is not set: no ComfyUI checkout to sample with")


def test_model_sampling_is_the_v51_flow_shift(flow_sampling_results):
    """ModelSamplingDiscreteFlow(shift=e): sigma = e t / (1 + (e - 1) t), fed to the model as sigma * 1000."""
    assert flow_sampling_results["shift"] == pytest.approx(math.e)
    assert flow_sampling_results["sigma_formula_max_diff"] <= 1e-6
    assert flow_sampling_results["timestep_of_sigma"] == pytest.approx(500.0)


def test_comfy_euler_on_our_model_reproduces_core_flow_sampler(flow_sampling_results):
    """Same noise, steps, sigmas and guidance: ComfyUI's euler + CFG on our MODEL equals the core Flow loop.

    Both run float32 on CPU; they differ only in rounding (ComfyUI forms x0 = x - sigma v and divides it back
    into v, and guides x0 instead of v): measured 1.4e-6 of the latents' scale after 6 steps; bound 1e-5.
    """
    scale = flow_sampling_results["latent_max_abs"]
    assert scale > 0.1  # a real sample, not zeros
    assert flow_sampling_results["latent_max_diff"] <= 1e-5 * scale


def test_v5_model_sampling_is_v_prediction_with_zero_terminal_snr(flow_sampling_results):
    """ComfyUI's zsnr table equals core's rescaled scaled_linear schedule: measured 1.9e-5 relative (core
    computes in float32, ComfyUI in float64)."""
    assert {"ModelSamplingDiscrete", "V_PREDICTION"} <= set(flow_sampling_results["v5_sampling_classes"])
    assert flow_sampling_results["v5_sigma_max_rel_diff"] <= 1e-4
    assert flow_sampling_results["v5_sigma_max"] > 1000  # ComfyUI's finite stand-in for infinite (zero SNR)


def test_weight_patch_changes_the_sample_and_the_unpatched_model_restores_it(flow_sampling_results):
    """add_patches on a clone (LoraLoader's way) changes the latents; sampling the original again is bit-exact."""
    assert flow_sampling_results["patched_max_diff"] > 1e-3 * flow_sampling_results["latent_max_abs"]
    assert flow_sampling_results["restored_max_diff"] == 0.0


def test_forced_partial_load_gives_the_full_load_output(flow_sampling_results):
    """ModelPatcher with a near-zero weight budget streams every comfy.ops layer; the output is bit-identical."""
    assert flow_sampling_results["partial_streamed_layers"] > 10
    assert flow_sampling_results["partial_lowvram"]
    assert flow_sampling_results["partial_max_diff"] == 0.0


def test_lora_node_patches_equal_core_merged_weights(flow_sampling_results):
    """EasyAnimate LoRA Loader: ComfyUI's patching of an official-layout LoRA gives core's merged weights,
    changes the output, and unpatching restores it."""
    r = flow_sampling_results
    assert r["lora_weight_max_diff"] <= 1e-6
    assert r["lora_output_change"] > 1e-3 * r["base_output_max_abs"]
    assert r["lora_unpatched_diff"] == 0.0


def test_stock_lora_loader_refuses_an_easyanimate_lora_it_cannot_map_instead_of_ignoring_it(flow_sampling_results):
    """LoraLoaderModelOnly with official (kohya), peft and diffusers EasyAnimate LoRAs: an error naming our loader,
    never a run that succeeds with the LoRA silently dropped."""
    stock = flow_sampling_results["stock_lora"]
    assert set(stock) == {"official", "peft", "diffusers"}
    for layout, message in stock.items():
        assert "matched no layer of the EasyAnimate MODEL" in message, (layout, message)
        assert "Load it with EasyAnimate LoRA Loader" in message, (layout, message)
