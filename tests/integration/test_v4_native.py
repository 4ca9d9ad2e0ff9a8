"""EasyAnimate V4 as a native MODEL in real ComfyUI: its sampling equals the core V4 pipeline, and a text-to-video
graph (our loaders, stock KSampler, our VAE decode) runs through the server."""

from __future__ import annotations

import pytest
from comfy_harness import PACK_IMPORT_SCRIPT, run_in_comfy_python

from tests.integration.test_native_model import text_to_video_prompt
from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration

FOLDER = "tiny-v4-inp"

SAMPLING_SCRIPT = (
    PACK_IMPORT_SCRIPT
    + r"""
from easyanimate_core.loading import load_transformer, load_vae
from easyanimate_core.pipeline import generate
from easyanimate_core.sampling import make_sampler
from easyanimate_core.text_encoders import load_text_encoders
loaders = sys.modules["easyanimate_pack.nodes.loaders"]
sampler_node = sys.modules["easyanimate_pack.nodes.sampler"]

STEPS, GUIDANCE, FRAMES, H, W = 6, 7.0, 16, 32, 64
root = tempfile.mkdtemp() + "/tiny"
write_tiny_checkpoint(root, "InP", version="V4")
model = loaders.load_native_model(root)
te = loaders.EasyAnimateTextEncoderHandle(load_text_encoders(root, "v4"))
encode = loaders.EasyAnimateTextEncode().encode
positive, negative = encode(te, "a red fox")[0], encode(te, "blurry")[0]
shape = (1, 4, FRAMES // 4, H // 8, W // 8)
noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))

# ComfyUI: EasyAnimate Sampler with the released defaults (euler on the V4 leading timesteps), seed 3's noise.
latent = {"samples": torch.zeros(shape)}
(out,) = sampler_node.EasyAnimateSampler().sample(model, positive, negative, latent, 3, STEPS, GUIDANCE,
                                                   "default", "default", 1.0, 0.0)
comfy_latents = out["samples"] * model.model.latent_format.scale_factor  # LATENT is VAE space; core's model space
comfy_noise = torch.randn(shape, generator=torch.manual_seed(3))  # ComfyUI's prepare_noise

# Core: the V4 pipeline with diffusers-style Euler from the same noise.
transformer = load_transformer(root, dtype=torch.float32)
vae = load_vae(root, dtype=torch.float32)
prompts = load_text_encoders(root, "v4").encode("a red fox", "blurry")
core_latents = generate(transformer, vae, prompts, make_sampler("Euler", "V4", STEPS), frames=FRAMES, height=H,
                        width=W, guidance=GUIDANCE, latents=comfy_noise, decode=False)
diff = (comfy_latents - core_latents).abs().max().item()
print(json.dumps({"max_diff": diff, "scale": core_latents.abs().max().item(), "shape": list(comfy_latents.shape)}))
"""
)


@pytest.fixture(scope="module")
def v4_sampling():
    return run_in_comfy_python(SAMPLING_SCRIPT, "COMFYUI_PATH is not set: no ComfyUI checkout to sample with")


def test_easyanimate_sampler_on_the_v4_model_reproduces_the_core_v4_pipeline(v4_sampling):
    assert v4_sampling["shape"] == [1, 4, 4, 4, 8]
    # The node scales ComfyUI's start noise to the released sqrt(sigma_0^2 + 1) (without that: 1.5e-4 relative at
    # 6 steps); what is left is float32 operation order and ComfyUI's float64 sigma table.
    assert v4_sampling["max_diff"] <= 1e-5 * v4_sampling["scale"], v4_sampling


@pytest.fixture(scope="module")
def tiny_v4(comfy_server):
    root = comfy_server.base_dir / "models" / "EasyAnimate" / FOLDER
    if not root.is_dir():
        write_tiny_checkpoint(root, "InP", version="V4")
    return FOLDER


def test_v4_text_to_video_graph_runs_to_frames_of_the_requested_count(comfy_server, tiny_v4):
    prompt = text_to_video_prompt(tiny_v4, "V4", frames=16, prefix="easyanimate_v4_t2v")
    files = comfy_server.output_files(comfy_server.run_prompt(prompt, timeout=300))
    assert len(files) == 16 and all(f.stat().st_size > 0 for f in files)


def test_v4_frames_not_a_multiple_of_8_are_refused_at_validation(comfy_server, tiny_v4):
    from comfy_harness import ComfyError

    prompt = text_to_video_prompt(tiny_v4, "V4", frames=17, prefix="easyanimate_v4_bad")
    with pytest.raises(ComfyError, match="frames 17 must be a multiple of 8 for V4; nearest valid: 16 or 24"):
        comfy_server.run_prompt(prompt, timeout=60)


I2V_SCRIPT = (
    SAMPLING_SCRIPT.split("# ComfyUI: EasyAnimate Sampler")[0]
    + r"""
from easyanimate_core.image_encoder import load_image_encoder
conditioning = sys.modules["easyanimate_pack.nodes.conditioning"]
vae_nodes = sys.modules["easyanimate_pack.nodes.vae_nodes"]
import folder_paths, os
# The temporary folder as one more models/EasyAnimate/ (in this process only): nothing is written into ComfyUI.
folder_paths.add_model_folder_path("EasyAnimate", os.path.dirname(root))
(vae,) = vae_nodes.EasyAnimateVAELoader().load(os.path.basename(root))[:1]
(image_encoder,) = loaders.EasyAnimateImageEncoderLoader().load(os.path.basename(root))
start = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(9))
pos, neg, latent = conditioning.EasyAnimateImageToVideo().encode(
    positive, negative, vae, W, H, FRAMES, 1, 0.0563, start_image=start, image_encoder=image_encoder)
(out,) = sampler_node.EasyAnimateSampler().sample(model, pos, neg, latent, 3, STEPS, GUIDANCE,
                                                   "default", "default", 1.0, 0.0)
comfy_latents = out["samples"] * model.model.latent_format.scale_factor
comfy_noise = torch.randn(shape, generator=torch.manual_seed(3))
transformer = load_transformer(root, dtype=torch.float32)
core_vae = load_vae(root, dtype=torch.float32)
prompts = load_text_encoders(root, "v4").encode("a red fox", "blurry")
# ComfyUI keeps encoders in text_encoder_dtype() (float16, even on the CPU): core's encoder in the same dtype.
encoder = load_image_encoder(root, dtype=image_encoder.encoder.dtype)
# seed 0: the generator the node's posterior samples come from (AUG_NOISE_SEED), the noise is given
core_latents = generate(transformer, core_vae, prompts, make_sampler("Euler", "V4", STEPS), frames=FRAMES, height=H,
                        width=W, guidance=GUIDANCE, seed=0, latents=comfy_noise, start_image=start[0],
                        image_encoder=encoder, decode=False)
without_clip = generate(transformer, core_vae, prompts, make_sampler("Euler", "V4", STEPS), frames=FRAMES, height=H,
                        width=W, guidance=GUIDANCE, seed=0, latents=comfy_noise, start_image=start[0],
                        image_encoder=encoder, clip_apply_ratio=0.0, decode=False)
print(json.dumps({"max_diff": (comfy_latents - core_latents).abs().max().item(),
                  "clip_effect": (core_latents - without_clip).abs().max().item(),
                  "scale": core_latents.abs().max().item()}))
"""
)


def test_v4_image_to_video_nodes_reproduce_the_core_v4_pipeline():
    result = run_in_comfy_python(I2V_SCRIPT, "COMFYUI_PATH is not set: no ComfyUI checkout to sample with")
    assert result["clip_effect"] > 1e-3 * result["scale"], result  # the CLIP features matter on these steps
    assert result["max_diff"] <= 1e-5 * result["scale"], result
