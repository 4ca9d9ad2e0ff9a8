"""EasyAnimate V1 / V2 / V3 in the nodes, on the ComfyUI stand-in: loaders (listing and detection), model sampling,
T5 conditioning with its mask, V3 image-to-video (slice-VAE mask latents and CLIP image embeddings), the sampler's
released defaults and the VAE.

Sampling itself runs in real ComfyUI: tests/integration/test_workflows.py (the V3 and V2 workflows).
"""

from __future__ import annotations

import sys

import pytest
import torch

from easyanimate_core.pipeline import VideoSize, encoded_mask_inpaint_latents, image_to_video_inputs
from easyanimate_core.sampling import SCHEDULES, alphas_cumprod, make_sampler
from easyanimate_core.transformer_v3 import CLIP_TOKENS
from tests.comfy_standin import install

VARIANT = {"V3": "InP", "V2": "T2V", "V1": "T2V"}


def conditioning(nodes, name: str, text: str = "a dog walks"):
    (encoder,) = nodes.nodes.EasyAnimateTextEncoderLoader().load(name)
    return nodes.nodes.EasyAnimateTextEncode().encode(encoder, text)[0]


@pytest.mark.parametrize("version", ["V3", "V2", "V1"])
def test_loaders_list_and_detect_the_family(nodes, tiny_folders, version):
    name = install(nodes, tiny_folders, version)
    loader = nodes.nodes.EasyAnimateModelLoader
    assert name in loader.INPUT_TYPES()["required"]["model_folder"][0]
    assert loader.VALIDATE_INPUTS(name) is True
    model, info = loader().load(name, "default")
    assert f"EasyAnimate {version} transformer" in info
    net = model.model.diffusion_model
    assert (net.version, net.variant, model.model.model_config.version) == (version, VARIANT[version], version)
    assert model.model.latent_format.latent_channels == 4
    vae = nodes.nodes.EasyAnimateVAELoader().load(name)[0]
    assert vae.first_stage_model.info.version == version and vae.latent_channels == 4


def test_model_sampling_is_epsilon_on_the_linear_betas(nodes, tiny_folders):
    model = nodes.nodes.EasyAnimateModelLoader().load(install(nodes, tiny_folders, "V2"), "default")[0]
    assert model.model.model_type.name == "EPS"
    abar = alphas_cumprod(SCHEDULES["V2"]).double()
    expected = ((1 - abar) / abar).sqrt()
    sigmas = model.get_model_object("model_sampling").sigmas.double()
    torch.testing.assert_close(sigmas, expected, rtol=1e-4, atol=0)


def test_t5_conditioning_carries_its_mask_to_the_transformer(nodes, tiny_folders):
    name = install(nodes, tiny_folders, "V2")
    [[embeds, extras]] = conditioning(nodes, name)
    assert embeds.shape == (1, 120, 32) and set(extras) == {"easyanimate_text_mask"}
    assert 0 < int(extras["easyanimate_text_mask"].sum()) < 120  # a short prompt leaves padding
    model = nodes.nodes.EasyAnimateModelLoader().load(name, "default")[0]
    noise = torch.zeros(1, 4, 3, 4, 4)
    conds = model.model.extra_conds(cross_attn=embeds, noise=noise, **extras)
    kwargs = {k: v.cond for k, v in conds.items() if hasattr(v, "cond")}
    net = model.model.diffusion_model
    x = torch.randn(1, 4, 3, 4, 4)
    out = net(x, torch.tensor([500.0]), embeds, **kwargs)
    assert out.shape == x.shape  # the learned-variance half is dropped
    core = net.transformer(x, torch.tensor([500.0]), embeds, encoder_attention_mask=extras["easyanimate_text_mask"])
    torch.testing.assert_close(out, core[:, :4], rtol=0, atol=0)
    # Without the mask the model refuses, naming the fix.
    with pytest.raises(ValueError, match="reads the T5 prompt's token mask"):
        model.model.extra_conds(cross_attn=embeds, noise=noise)


def test_empty_latent_follows_each_vae_frame_rule(nodes):
    node = nodes.nodes.EasyAnimateEmptyLatentVideo
    assert {"V3", "V2", "V1"} <= set(node.INPUT_TYPES()["required"]["version"][0])
    assert node().generate("V3", 64, 32, 16, 1)[0]["samples"].shape == (1, 4, 4, 4, 8)  # 8 frames -> 2 latents
    assert node().generate("V2", 64, 32, 18, 1)[0]["samples"].shape == (1, 4, 6, 4, 8)  # 9 frames -> 3 latents
    assert node().generate("V1", 64, 32, 5, 1)[0]["samples"].shape == (1, 4, 5, 4, 8)  # one latent a frame
    assert node.VALIDATE_INPUTS("V2", 64, 32, 16) == "frames 16 must be a multiple of 9 for V2; nearest valid: 9 or 18"
    assert node.VALIDATE_INPUTS("V1", 64, 32, 7) is True


def test_sampler_default_is_dpmpp_2m_on_the_released_linspace_timesteps(nodes, tiny_folders):
    name = install(nodes, tiny_folders, "V2")
    model = nodes.nodes.EasyAnimateModelLoader().load(name, "default")[0]
    cond = conditioning(nodes, name)
    calls = sys.modules["comfy.sample"].calls
    calls.clear()
    latent = {"samples": torch.zeros(1, 4, 3, 4, 4)}
    nodes.nodes.EasyAnimateSampler().sample(model, cond, cond, latent, 3, 30, 6.0, "default", "default", 1.0, 0.0)
    (call,) = calls
    assert call["sampler_name"] == "dpmpp_2m"
    core = make_sampler("DPM++", "V2", 30)
    assert core.timesteps[:3].long().tolist() == [999, 966, 932]  # DPM-Solver's linspace, as released
    torch.testing.assert_close(call["sigmas"].double(), core.sigmas.double(), rtol=1e-4, atol=0)
    # The first sigma is the largest: ComfyUI's own start (sqrt(sigma^2 + 1) * noise) is the released one.
    expected_noise = torch.randn(1, 4, 3, 4, 4, generator=torch.manual_seed(3))
    torch.testing.assert_close(call["noise"], expected_noise, rtol=0, atol=0)


def test_v3_image_to_video_attaches_vae_mask_latents_and_the_clip_embedding(nodes, tiny_folders):
    name = install(nodes, tiny_folders, "V3")
    vae = nodes.nodes.EasyAnimateVAELoader().load(name)[0]
    (image_encoder,) = nodes.nodes.EasyAnimateImageEncoderLoader().load(name)
    cond = conditioning(nodes, name)
    start = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(1))
    i2v = nodes.nodes.EasyAnimateImageToVideo()
    positive, negative, latent = i2v.encode(cond, cond, vae, 32, 32, 8, 1, 0.0563, start, None, image_encoder)
    assert latent["samples"].shape == (1, 4, 2, 4, 4)
    (_, pos), (_, neg) = positive[0], negative[0]
    pixels, mask = image_to_video_inputs(start[0], None, VideoSize(8, 32, 32))
    core = vae.first_stage_model
    expected = encoded_mask_inpaint_latents(
        core, pixels, mask, (1, 4, 2, 4, 4), torch.Generator().manual_seed(0), "cpu"
    )
    torch.testing.assert_close(pos["easyanimate_inpaint_latents"], expected, rtol=0, atol=0)
    # V3 reads the projected CLIP embedding of the start image as given (not resized to the video).
    assert pos["easyanimate_clip"].shape == (1, 768) and neg["easyanimate_clip"].abs().sum() == 0
    torch.testing.assert_close(pos["easyanimate_clip"], image_encoder.encoder.encode(start[0]), rtol=0, atol=0)
    # The model reads them on the last half of the steps, the CLIP tokens masked on the negative branch.
    model = nodes.nodes.EasyAnimateModelLoader().load(name, "default")[0]
    net = model.model.diffusion_model
    seen = []
    transformer_forward = net.transformer.forward
    net.transformer.forward = lambda *a, **k: seen.append(k) or transformer_forward(*a, **k)
    embeds, extras = positive[0]
    x = torch.randn(1, 4, 2, 4, 4)
    conds = model.model.extra_conds(cross_attn=embeds, noise=x, **extras)
    kwargs = {k: v.cond for k, v in conds.items() if hasattr(v, "cond")}
    sigmas = torch.linspace(10, 0, 5)
    for step in (0, 3):
        options = {"sample_sigmas": sigmas, "sigmas": sigmas[step : step + 1]}
        net(x, torch.tensor([500.0]), embeds, transformer_options=options, **kwargs)
    early, late = seen
    assert torch.equal(early["clip_attention_mask"], torch.zeros(1, CLIP_TOKENS))  # masked zero features
    assert early["clip_encoder_hidden_states"].abs().sum() == 0
    assert torch.equal(late["clip_attention_mask"], torch.ones(1, CLIP_TOKENS))
    torch.testing.assert_close(late["clip_encoder_hidden_states"], pos["easyanimate_clip"])


def test_v3_image_to_video_needs_the_image_encoder(nodes, tiny_folders):
    name = install(nodes, tiny_folders, "V3")
    vae = nodes.nodes.EasyAnimateVAELoader().load(name)[0]
    cond = conditioning(nodes, name)
    start = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match="V3 image-to-video also conditions on the start image's CLIP features"):
        nodes.nodes.EasyAnimateImageToVideo().encode(cond, cond, vae, 32, 32, 8, 1, 0.0563, start, None, None)


def test_v3_text_to_video_feeds_the_masked_zero_clip_tokens(nodes, tiny_folders):
    """As the official V3 pipeline does for an InP model without an image."""
    name = install(nodes, tiny_folders, "V3")
    model = nodes.nodes.EasyAnimateModelLoader().load(name, "default")[0]
    net = model.model.diffusion_model
    seen = []
    transformer_forward = net.transformer.forward
    net.transformer.forward = lambda *a, **k: seen.append(k) or transformer_forward(*a, **k)
    [[embeds, extras]] = conditioning(nodes, name)
    x = torch.randn(1, 4, 2, 4, 4)
    conds = model.model.extra_conds(cross_attn=embeds, noise=x, **extras)
    net(x, torch.tensor([500.0]), embeds, **{k: v.cond for k, v in conds.items() if hasattr(v, "cond")})
    (call,) = seen
    assert call["clip_encoder_hidden_states"].shape == (1, 768) and call["clip_encoder_hidden_states"].abs().sum() == 0
    assert torch.equal(call["clip_attention_mask"], torch.zeros(1, CLIP_TOKENS))
    assert call["inpaint_latents"].shape == (1, 8, 2, 4, 4)


def test_v3_image_to_video_without_images_is_the_official_text_to_video_conditioning(nodes, tiny_folders):
    """V3's predict_t2v.py feeds an InP model the all-generate mask and video through the VAE (not zeros)."""
    name = install(nodes, tiny_folders, "V3")
    vae = nodes.nodes.EasyAnimateVAELoader().load(name)[0]
    cond = conditioning(nodes, name)
    positive, _, latent = nodes.nodes.EasyAnimateImageToVideo().encode(cond, cond, vae, 32, 32, 8, 1, 0.0563)
    pixels, mask = image_to_video_inputs(None, None, VideoSize(8, 32, 32))
    assert bool((mask == 1).all())
    generator = torch.Generator().manual_seed(0)
    expected = encoded_mask_inpaint_latents(vae.first_stage_model, pixels, mask, (1, 4, 2, 4, 4), generator, "cpu")
    inpaint = positive[0][1]["easyanimate_inpaint_latents"]
    torch.testing.assert_close(inpaint, expected, rtol=0, atol=0)
    assert inpaint.abs().sum() > 0 and "easyanimate_clip" not in positive[0][1]


def test_lora_loader_patches_a_v3_model_from_an_official_format_lora(nodes, tiny_folders, tmp_path):
    """Official V1-V3 LoRAs name every Linear, motion modules included (lora_unet__<path>)."""
    from safetensors.torch import save_file

    model = nodes.nodes.EasyAnimateModelLoader().load(install(nodes, tiny_folders, "V3"), "default")[0]
    transformer = model.model.diffusion_model.transformer
    paths = ["transformer_blocks.1.attn_temporal.temporal_transformer.proj_in", "transformer_blocks.0.attn2.to_k"]
    tensors = {}
    for path in paths:
        weight = transformer.get_submodule(path).weight
        name = "lora_unet__" + path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, weight.shape[1])
        tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], 2)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(tensors, loras / "v3_style.safetensors")
    sys.modules["folder_paths"].add_model_folder_path("loras", str(loras))
    patched = nodes.nodes.EasyAnimateLoraLoader().apply(model, "v3_style.safetensors", 0.5)[0]
    assert set(patched.patches) == {f"diffusion_model.transformer.{p}.weight" for p in paths}
