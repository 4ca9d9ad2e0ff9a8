"""EasyAnimate V1 / V2 / V3 as native MODELs in real ComfyUI: the loaders list and detect each family, the EasyAnimate
Sampler's released default (ComfyUI's dpmpp_2m on the released DPM++ timesteps, epsilon prediction) equals the core
pipeline, and a V1 text-to-video graph (per-frame image VAE) runs through the server. The V2 and V3 workflows run in
test_workflows.py."""

from __future__ import annotations

import pytest
from comfy_harness import PACK_IMPORT_SCRIPT, run_in_comfy_python

from tests.integration.test_native_model import text_to_video_prompt
from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration

FOLDERS = {"V3": ("tiny-v3-inp-native", "InP"), "V2": ("tiny-v2-t2v-native", "T2V"), "V1": ("tiny-v1-t2v", "T2V")}

SAMPLING_SCRIPT = (
    PACK_IMPORT_SCRIPT
    + r"""
from easyanimate_core.loading import load_transformer, load_vae
from easyanimate_core.pipeline import generate
from easyanimate_core.sampling import make_sampler
from easyanimate_core.text_encoders import load_text_encoders
loaders = sys.modules["easyanimate_pack.nodes.loaders"]
sampler_node = sys.modules["easyanimate_pack.nodes.sampler"]

results = {}
for version, frames, steps in (("V2", 9, 6), ("V3", 8, 6)):
    root = tempfile.mkdtemp() + "/tiny"
    write_tiny_checkpoint(root, "InP" if version == "V3" else "T2V", version=version)
    H = W = 32
    model = loaders.load_native_model(root)
    te = loaders.EasyAnimateTextEncoderHandle(load_text_encoders(root, version))
    encode = loaders.EasyAnimateTextEncode().encode
    positive, negative = encode(te, "a red fox")[0], encode(te, "blurry")[0]
    vae = load_vae(root, dtype=torch.float32)
    shape = (1, 4, vae.latent_frames(frames), H // 8, W // 8)
    # ComfyUI: EasyAnimate Sampler with the released defaults (dpmpp_2m on DPM++'s linspace timesteps), seed 3.
    latent = {"samples": torch.zeros(shape)}
    (out,) = sampler_node.EasyAnimateSampler().sample(model, positive, negative, latent, 3, steps, 7.0,
                                                       "default", "default", 1.0, 0.0)
    comfy_latents = out["samples"] * model.model.latent_format.scale_factor  # LATENT is VAE space
    comfy_noise = torch.randn(shape, generator=torch.manual_seed(3))  # ComfyUI's prepare_noise
    # Core: the V1-V3 pipeline with diffusers-style DPM++ from the same noise. A V3 InP model under an Empty Latent
    # reads zero inpaint latents in ComfyUI (the official all-generate ones come from Image To Video without
    # images): the core run is given zeros too.
    transformer = load_transformer(root, dtype=torch.float32)
    prompts = load_text_encoders(root, version).encode("a red fox", "blurry")
    if version == "V3":
        import easyanimate_core.pipeline as pipeline

        def zero_inpaint(vae, video, mask, latent_shape, generator, device):
            return torch.zeros(latent_shape[0], 8, *latent_shape[2:])

        pipeline.encoded_mask_inpaint_latents = zero_inpaint
    core_latents = generate(transformer, vae, prompts, make_sampler("DPM++", version, steps), frames=frames,
                            height=H, width=W, guidance=7.0, latents=comfy_noise, decode=False)
    diff = (comfy_latents - core_latents).abs().max().item()
    results[version] = {"max_diff": diff, "scale": core_latents.abs().max().item(), "shape": list(comfy_latents.shape)}
print(json.dumps(results))
"""
)


@pytest.fixture(scope="module")
def pixart_sampling():
    return run_in_comfy_python(SAMPLING_SCRIPT, "COMFYUI_PATH is not set: no ComfyUI checkout to sample with")


@pytest.mark.parametrize(("version", "shape"), [("V2", [1, 4, 3, 4, 4]), ("V3", [1, 4, 2, 4, 4])])
def test_easyanimate_sampler_reproduces_the_core_pipeline(pixart_sampling, version, shape):
    result = pixart_sampling[version]
    assert result["shape"] == shape
    # ComfyUI's dpmpp_2m (k-diffusion, float64 sigma table) against diffusers-style DPM-Solver++(2M) in float32.
    assert result["max_diff"] <= 1e-4 * result["scale"], result


@pytest.fixture(scope="module")
def tiny_pixart(comfy_server):
    root = comfy_server.base_dir / "models" / "EasyAnimate"
    for version, (name, variant) in FOLDERS.items():
        if not (root / name).is_dir():
            write_tiny_checkpoint(root / name, variant, version=version)
    return {version: name for version, (name, _) in FOLDERS.items()}


def test_loaders_list_and_detect_each_family(comfy_server, tiny_pixart):
    info = comfy_server.get_json("/object_info")
    for node in ("EasyAnimateModelLoader", "EasyAnimateTextEncoderLoader", "EasyAnimateVAELoader"):
        listed = info[node]["input"]["required"]["model_folder"][0]
        assert set(tiny_pixart.values()) <= set(listed), (node, listed)
    assert tiny_pixart["V3"] in info["EasyAnimateImageEncoderLoader"]["input"]["required"]["model_folder"][0]
    versions = info["EasyAnimateEmptyLatentVideo"]["input"]["required"]["version"][0]
    assert {"V3", "V2", "V1"} <= set(versions)


@pytest.mark.parametrize(("version", "frames"), [("V1", 3), ("V2", 9)])
def test_text_to_video_graph_runs_to_frames_of_the_requested_count(comfy_server, tiny_pixart, version, frames):
    prompt = text_to_video_prompt(tiny_pixart[version], version, frames=frames, prefix=f"easyanimate_{version}_t2v")
    entry = comfy_server.run_prompt(prompt, timeout=300)
    files = comfy_server.output_files(entry)
    assert len(files) == frames and all(f.stat().st_size > 0 for f in files)
