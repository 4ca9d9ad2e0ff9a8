"""EasyAnimate V4 in the nodes, on the ComfyUI stand-in: loader, model sampling, latents, text conditioning, sampler.

Sampling itself (ComfyUI's euler on our V4 MODEL against the core V4 pipeline) runs in real ComfyUI:
tests/integration/test_v4_native.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from easyanimate_core.sampling import SCHEDULES, alphas_cumprod, make_sampler
from easyanimate_core.vae import VAE_V4
from tests.comfy_standin import install


@pytest.fixture
def v4_model(nodes, tiny_folders):
    return nodes.nodes.EasyAnimateModelLoader().load(install(nodes, tiny_folders, "V4"), "default")


def v4_conditioning(nodes, tiny_folders, text="a cat"):
    loader = nodes.nodes.EasyAnimateTextEncoderLoader()
    (encoder,) = loader.load("tiny-V4")
    return nodes.nodes.EasyAnimateTextEncode().encode(encoder, text)[0]


def test_the_model_loader_takes_a_v4_folder(nodes, v4_model):
    model, info = v4_model
    assert "V4" in info and model.model.model_config.version == "V4"
    net = model.model.diffusion_model
    assert net.version == "V4" and net.variant == "InP" and net.inpaint_channels == 8
    fmt = model.model.latent_format
    assert fmt.latent_channels == VAE_V4.latent_channels == 4 and fmt.scale_factor == VAE_V4.scaling_factor


def test_v4_model_sampling_is_v_prediction_on_the_released_betas(nodes, v4_model):
    model = v4_model[0]
    assert model.model.model_type.name == "V_PREDICTION"
    ms = model.get_model_object("model_sampling")
    abar = alphas_cumprod(SCHEDULES["V4"]).double()
    expected = ((1 - abar) / abar).sqrt()
    # ComfyUI's table (float64 betas, stored float32) against core's float32 cumulative product: 1e-4 relative.
    torch.testing.assert_close(ms.sigmas.double(), expected, rtol=1e-4, atol=0)


def test_v4_text_encode_carries_both_streams_and_their_masks(nodes, tiny_folders):
    install(nodes, tiny_folders, "V4")
    [[embeds, extras]] = v4_conditioning(nodes, tiny_folders)
    assert {"easyanimate_text_2", "easyanimate_text_mask", "easyanimate_text_2_mask"} <= set(extras)
    assert extras["easyanimate_text_mask"].shape == embeds.shape[:2]
    assert extras["easyanimate_text_2_mask"].shape == extras["easyanimate_text_2"].shape[:2]
    assert 0 < int(extras["easyanimate_text_mask"].sum()) < embeds.shape[1]  # "a cat" leaves padding


def test_v4_conditioning_reaches_the_transformer_with_its_masks(nodes, tiny_folders, v4_model):
    model = v4_model[0]
    [[embeds, extras]] = v4_conditioning(nodes, tiny_folders)
    noise = torch.zeros(1, 4, 2, 2, 4)
    conds = model.model.extra_conds(cross_attn=embeds, noise=noise, **extras)
    assert {"encoder_hidden_states_t5", "text_embedding_mask", "text_embedding_mask_t5"} <= set(conds)
    net = model.model.diffusion_model
    kwargs = {k: v.cond for k, v in conds.items() if hasattr(v, "cond")}
    out = net(torch.randn(1, 4, 2, 2, 4), torch.tensor([500.0]), embeds, **kwargs)
    assert out.shape == (1, 4, 2, 2, 4)  # the learned-sigma half is dropped


def test_v5_style_conditioning_on_a_v4_model_is_refused_naming_the_fix(nodes, tiny_folders, v4_model):
    model = v4_model[0]
    [[embeds, extras]] = v4_conditioning(nodes, tiny_folders)
    extras = {k: v for k, v in extras.items() if "mask" not in k}
    with pytest.raises(ValueError, match="reads the prompt's token masks.*load the text encoder from the V4 model"):
        model.model.extra_conds(cross_attn=embeds, noise=torch.zeros(1, 4, 2, 2, 4), **extras)


def test_empty_latent_for_v4_has_4_channels_and_takes_multiples_of_8_frames(nodes):
    node = nodes.nodes.EasyAnimateEmptyLatentVideo
    assert "V4" in node.INPUT_TYPES()["required"]["version"][0]
    (latent,) = node().generate("V4", 64, 32, 16, 1)
    assert latent["samples"].shape == (1, 4, 4, 4, 8)  # 16 frames -> 4 latents (slice VAE), 1/8 size
    assert node.VALIDATE_INPUTS("V4", 64, 32, 16) is True
    assert node.VALIDATE_INPUTS("V4", 64, 32, 17) == "frames 17 must be a multiple of 8 for V4; nearest valid: 16 or 24"
    assert node.VALIDATE_INPUTS("V5.1", 64, 32, 17) is True


def test_v4_sampler_default_is_euler_on_the_released_leading_timesteps(nodes, tiny_folders, v4_model):
    model = v4_model[0]
    cond = v4_conditioning(nodes, tiny_folders)
    calls = sys.modules["comfy.sample"].calls
    calls.clear()
    latent = {"samples": torch.zeros(1, 4, 2, 2, 4)}
    nodes.nodes.EasyAnimateSampler().sample(model, cond, cond, latent, 3, 25, 7.0, "default", "default", 1.0, 0.0)
    (call,) = calls
    assert call["sampler_name"] == "euler"
    core = make_sampler("Euler", "V4", 25)
    assert core.timesteps[:3].long().tolist() == [961, 921, 881]  # leading spacing, steps_offset 1
    # ComfyUI's sigma table (float64, then float32) at the released timesteps against core's float32 one.
    torch.testing.assert_close(call["sigmas"].double(), core.sigmas.double(), rtol=1e-4, atol=0)
    # ComfyUI starts at sigma_0 * noise; the released Euler at sqrt(sigma_0^2 + 1) * noise: the node scales the noise.
    sigma_0 = float(call["sigmas"][0])
    expected_noise = torch.randn(1, 4, 2, 2, 4, generator=torch.manual_seed(3)) * (sigma_0**2 + 1) ** 0.5 / sigma_0
    torch.testing.assert_close(call["noise"], expected_noise, rtol=1e-5, atol=0)


def v4_i2v_inputs(nodes, tiny_folders):
    name = install(nodes, tiny_folders, "V4")
    vae = nodes.nodes.EasyAnimateVAELoader().load(name)[0]
    (image_encoder,) = nodes.nodes.EasyAnimateImageEncoderLoader().load(name)
    cond = v4_conditioning(nodes, tiny_folders)
    start = torch.rand(1, 32, 64, 3, generator=torch.Generator().manual_seed(2))
    return vae, image_encoder, cond, start


def test_v4_image_to_video_attaches_slice_vae_latents_and_clip_features(nodes, tiny_folders):
    from easyanimate_core.pipeline import VideoSize, encoded_mask_inpaint_latents, image_to_video_inputs

    vae, image_encoder, cond, start = v4_i2v_inputs(nodes, tiny_folders)
    node = nodes.nodes.EasyAnimateImageToVideo()
    positive, negative, latent = node.encode(cond, cond, vae, 64, 32, 16, 1, 0.0563, start, None, image_encoder)
    assert latent["samples"].shape == (1, 4, 4, 4, 8)
    pos, neg = positive[0][1], negative[0][1]
    pixels, mask = image_to_video_inputs(start[0], None, VideoSize(16, 32, 64))
    core = sys.modules[f"{nodes.package.__name__}.vae_nodes"].easyanimate_vae(vae)
    # The node's posterior samples come from the fixed generator seed 0 (outputs depend on inputs only).
    generator = torch.Generator().manual_seed(0)
    expected = encoded_mask_inpaint_latents(core, pixels, mask, (1, 4, 4, 4, 8), generator, "cpu")
    assert expected.shape == (1, 8, 4, 4, 8)  # mask latents + masked-video latents
    torch.testing.assert_close(pos["easyanimate_inpaint_latents"], expected, rtol=0, atol=0)
    assert pos["easyanimate_clip"].abs().sum() > 0 and neg["easyanimate_clip"].abs().sum() == 0
    assert float(pos["easyanimate_clip_weight"]) == 1.0 and float(neg["easyanimate_clip_weight"]) == 0.0


def test_v4_image_to_video_without_the_image_encoder_names_the_node_to_connect(nodes, tiny_folders):
    vae, _, cond, start = v4_i2v_inputs(nodes, tiny_folders)
    with pytest.raises(ValueError, match="connect an EasyAnimate Image Encoder Loader"):
        nodes.nodes.EasyAnimateImageToVideo().encode(cond, cond, vae, 64, 32, 16, 1, 0.0563, start, None, None)


def test_clip_features_reach_the_transformer_on_the_last_40_percent_of_the_steps(nodes):
    net_class = nodes.native.EasyAnimateNet
    sample_sigmas = torch.linspace(10, 0, 11)  # 10 steps
    active = [
        net_class.clip_step({"sample_sigmas": sample_sigmas, "sigmas": sample_sigmas[i : i + 1]}) for i in range(10)
    ]
    assert active == [False] * 6 + [True] * 4  # the official 0.4 of 10 steps
    assert net_class.clip_step(None)  # outside a sampling loop the features are used
