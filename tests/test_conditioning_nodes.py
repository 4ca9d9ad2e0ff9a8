"""Conditioning nodes (image / video / control to video) and the MODEL's checks of what they attach, on the stand-in."""

from __future__ import annotations

import pytest
import torch

from easyanimate_core.pipeline import (
    NOISE_AUG_STRENGTH,
    VideoSize,
    control_latents,
    image_to_video_inputs,
    inpaint_latents,
    to_model_pixels,
)
from tests.comfy_standin import install, link_tree
from tests.tiny_checkpoint import write_tiny_checkpoint

W, H, F = 32, 16, 5  # 2 latent frames of 4 x 2 latent pixels
SIZE = VideoSize(F, H, W)


@pytest.fixture(scope="module")
def control_folders(tmp_path_factory):
    """Tiny random Control checkpoints for V5.1 (control + reference, 48 channels) and V5 (control, 32)."""
    root = tmp_path_factory.mktemp("tiny_control")
    return {v: write_tiny_checkpoint(root / v.replace(".", ""), "Control", version=v) for v in ("V5.1", "V5")}


def text_conditioning(version: str = "V5.1"):
    """CONDITIONING as EasyAnimate Text Encode makes it for the tiny checkpoints (32-wide embeddings)."""
    g = torch.Generator().manual_seed(1)
    extras = {"easyanimate_text_2": torch.randn(1, 6, 32, generator=g)} if version == "V5" else {}
    return [[torch.randn(1, 7, 32, generator=g), extras]]


def frames(n: int, seed: int, h: int = 24, w: int = 40) -> torch.Tensor:
    """IMAGE frames [n, h, w, 3] in [0, 1] (a size other than the target, so the nodes resize)."""
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def load_vae(nodes, tiny_folders, version="V5.1"):
    return nodes.nodes.EasyAnimateVAELoader().load(install(nodes, tiny_folders, version))[0]


def core_vae(vae):
    return vae.first_stage_model


def test_nodes_are_registered_with_three_outputs(nodes):
    for name in ("EasyAnimateImageToVideo", "EasyAnimateVideoToVideo", "EasyAnimateControlVideo"):
        cls = nodes.package.NODE_CLASS_MAPPINGS[name]
        assert cls.RETURN_TYPES == ("CONDITIONING", "CONDITIONING", "LATENT")
        required = cls.INPUT_TYPES()["required"]
        assert required["vae"][0] == "VAE" and all(spec[1].get("tooltip") for spec in required.values())


@pytest.mark.parametrize("node", ["EasyAnimateImageToVideo", "EasyAnimateVideoToVideo", "EasyAnimateControlVideo"])
def test_sizes_and_frames_are_validated_with_the_nearest_values(nodes, node):
    cls = nodes.package.NODE_CLASS_MAPPINGS[node]
    assert cls.VALIDATE_INPUTS(width=672, height=384, frames=49) is True
    takes_v4 = node in ("EasyAnimateImageToVideo", "EasyAnimateVideoToVideo")
    v4 = "; frames 50 must be a multiple of 8 for V4 / V3; nearest valid: 48 or 56" if takes_v4 else ""
    if node == "EasyAnimateVideoToVideo":  # every version re-noises a video, V1 (any frame count) too
        assert cls.VALIDATE_INPUTS(width=672, height=384, frames=50) is True
    else:
        assert cls.VALIDATE_INPUTS(width=672, height=384, frames=50) == (
            "frames 50 must be 4k+1 for V5.1; nearest valid: 49 or 53" + v4
        )
    assert (cls.VALIDATE_INPUTS(width=672, height=384, frames=48) is True) == takes_v4
    assert cls.VALIDATE_INPUTS(width=100, height=384, frames=49) == (
        "width 100 is not a multiple of 16; nearest valid: 96 or 112"
    )


def test_image_to_video_attaches_core_inpaint_latents_to_both_conditionings(nodes, tiny_folders):
    vae = load_vae(nodes, tiny_folders)
    positive, negative = text_conditioning(), text_conditioning()
    start, end = frames(1, 2), frames(2, 3)
    pos, neg, latent = nodes.nodes.EasyAnimateImageToVideo().encode(
        positive, negative, vae, W, H, F, 2, NOISE_AUG_STRENGTH, start_image=start, end_image=end
    )
    assert nodes.mm.loads == [[vae.patcher]]
    assert latent["samples"].shape == (2, 16, 2, 2, 4) and not latent["samples"].any()
    pixels, mask = image_to_video_inputs(start[0], end[-1], SIZE)  # the end image is the batch's last
    with torch.no_grad():
        expected = inpaint_latents(
            core_vae(vae), pixels, mask, (1, 16, 2, 2, 4), torch.Generator().manual_seed(0), NOISE_AUG_STRENGTH, "cpu"
        )
    for out, original in ((pos, positive), (neg, negative)):
        got = out[0][1]["easyanimate_inpaint_latents"]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert out[0][0] is original[0][0] and "easyanimate_inpaint_latents" not in original[0][1]  # copies
    assert expected.shape == (1, 17, 2, 2, 4) and expected[:, 0, 0].eq(0.7125).all()  # frame 0 kept


def test_image_to_video_without_images_says_what_to_connect(nodes, tiny_folders):
    vae = load_vae(nodes, tiny_folders)
    with pytest.raises(ValueError, match="connect a start_image and/or an end_image"):
        nodes.nodes.EasyAnimateImageToVideo().encode(text_conditioning(), text_conditioning(), vae, W, H, F, 1, 0.05)


def test_video_to_video_latent_is_the_raw_vae_mean_and_nothing_is_attached(nodes, tiny_folders):
    vae = load_vae(nodes, tiny_folders)
    positive = text_conditioning()
    video = frames(7, 4)  # more frames than requested: the first F are used
    pos, neg, latent = nodes.nodes.EasyAnimateVideoToVideo().encode(positive, positive, vae, video, W, H, F, 2)
    with torch.no_grad():
        mean, _ = core_vae(vae).encode(to_model_pixels(video[:F], SIZE))
    assert latent["samples"].shape == (2, 16, 2, 2, 4)
    # Through the VAE's own encode ([0, 1] in, so [-1, 1] pixels round-trip once): float32 rounding only.
    torch.testing.assert_close(latent["samples"], mean.repeat(2, 1, 1, 1, 1), rtol=0, atol=1e-6)
    # The official path regenerates every pixel: zero inpaint latents, which the MODEL feeds by itself.
    assert pos is positive and neg is positive


def test_video_to_video_with_a_mask_attaches_inpaint_latents_of_the_masked_video(nodes, tiny_folders):
    vae = load_vae(nodes, tiny_folders)
    video, mask = frames(F, 5), torch.zeros(1, 24, 40)
    mask[:, :, 20:] = 1.0  # regenerate the right half
    pos, _, latent = nodes.nodes.EasyAnimateVideoToVideo().encode(
        text_conditioning(), text_conditioning(), vae, video, W, H, F, 1, mask=mask
    )
    generate = torch.zeros(1, 1, F, H, W)
    generate[..., W // 2 :] = 1.0
    with torch.no_grad():
        expected = inpaint_latents(
            core_vae(vae),
            to_model_pixels(video, SIZE),
            generate,
            (1, 16, 2, 2, 4),
            torch.Generator().manual_seed(0),
            NOISE_AUG_STRENGTH,
            "cpu",
        )
    torch.testing.assert_close(pos[0][1]["easyanimate_inpaint_latents"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("node", ["EasyAnimateVideoToVideo", "EasyAnimateControlVideo"])
def test_a_video_shorter_than_frames_is_refused_naming_the_fix(nodes, tiny_folders, node):
    vae = load_vae(nodes, tiny_folders)
    cls = nodes.package.NODE_CLASS_MAPPINGS[node]
    with pytest.raises(ValueError, match="has 7 frames but frames is 9: set frames to 5 or less"):
        cls().encode(text_conditioning(), text_conditioning(), vae, frames(7, 6), W, H, 9, 1)


@pytest.mark.parametrize("with_ref", [False, True])
def test_control_video_attaches_core_control_latents(nodes, tiny_folders, with_ref):
    vae = load_vae(nodes, tiny_folders)
    control, ref = frames(F, 7), frames(1, 8) if with_ref else None
    pos, neg, latent = nodes.nodes.EasyAnimateControlVideo().encode(
        text_conditioning(), text_conditioning(), vae, control, W, H, F, 1, ref_image=ref
    )
    channels = 32 if with_ref else 16
    with torch.no_grad():
        expected = control_latents(
            core_vae(vae), control, None if ref is None else ref[0], (1, 16, 2, 2, 4), channels, SIZE, "cpu"
        )
    assert latent["samples"].shape == (1, 16, 2, 2, 4)
    for out in (pos, neg):
        torch.testing.assert_close(out[0][1]["easyanimate_control_latents"], expected, rtol=0, atol=0)
    assert expected.shape[1] == channels and expected[:, :16].abs().sum() > 0


def test_a_non_easyanimate_vae_is_refused(nodes):
    with pytest.raises(ValueError, match="not an EasyAnimate VAE; load it with EasyAnimate VAE Loader"):
        nodes.package.conditioning.easyanimate_vae(object())


# --- what the MODEL does with the attached latents (native_model.conditioning_error / extra_conds) -----------------


def load_model(nodes, folder: str):
    return nodes.nodes.EasyAnimateModelLoader().load(folder, "default")[0].model


def control_model(nodes, control_folders, version):
    name = f"control-{version}"
    link_tree(control_folders[version], nodes.models / name)
    return load_model(nodes, name)


def test_control_latents_on_an_inp_model_are_refused_before_any_step(nodes, tiny_folders):
    model = load_model(nodes, install(nodes, tiny_folders, "V5.1"))
    noise = torch.zeros(1, 16, 2, 2, 4)
    [[embeds, extras]] = text_conditioning()
    control = {"easyanimate_control_latents": torch.zeros(1, 16, 2, 2, 4)}
    with pytest.raises(ValueError, match="need an EasyAnimate Control model, but this model is InP: load a -Control"):
        model.extra_conds(cross_attn=embeds, noise=noise, **extras, **control)


def test_inpaint_latents_on_a_control_model_are_refused(nodes, control_folders):
    model = control_model(nodes, control_folders, "V5.1")
    [[embeds, _]] = text_conditioning()
    with pytest.raises(ValueError, match="need an EasyAnimate InP model, but this model is Control"):
        model.extra_conds(
            cross_attn=embeds,
            noise=torch.zeros(1, 16, 2, 2, 4),
            easyanimate_inpaint_latents=torch.zeros(1, 17, 2, 2, 4),
        )


def test_v51_control_without_reference_gets_the_zero_reference(nodes, control_folders):
    model = control_model(nodes, control_folders, "V5.1")
    [[embeds, _]] = text_conditioning()
    control = torch.randn(1, 16, 2, 2, 4)
    conds = model.extra_conds(cross_attn=embeds, noise=torch.zeros(1, 16, 2, 2, 4), easyanimate_control_latents=control)
    torch.testing.assert_close(conds["control_latents"].cond, control, rtol=0, atol=0)
    reference = conds["reference_latents"].cond  # one latent frame, given at frame 0 of the clip / each window
    assert reference.shape == (1, 16, 1, 2, 4) and not reference.any()


class ContextWindow:
    """What ComfyUI's context windows put in transformer_options["context_window"] (IndexListContextWindow)."""

    def __init__(self, index_list):
        self.index_list = index_list


@pytest.mark.parametrize("kind", ["InP", "Control"])
def test_a_context_window_cuts_the_conditioning_latents_the_way_it_cut_the_noise(
    nodes, tiny_folders, control_folders, kind
):
    """ComfyUI 0.3.x cuts only the noise to a window; the MODEL cuts its time-carrying conditioning to match, and a V5.1
    Control model's reference goes to the window's own first frame."""
    model = (
        load_model(nodes, install(nodes, tiny_folders, "V5.1"))
        if kind == "InP"
        else control_model(nodes, control_folders, "V5.1")
    )
    [[embeds, _]] = text_conditioning()
    g = torch.Generator().manual_seed(5)
    whole = torch.randn(1, 16, 6, 2, 4, generator=g)
    key, channels = ("easyanimate_inpaint_latents", 17) if kind == "InP" else ("easyanimate_control_latents", 32)
    latents = torch.randn(1, channels, 6, 2, 4, generator=g)
    conds = {k: v.cond for k, v in model.extra_conds(cross_attn=embeds, noise=whole, **{key: latents}).items()}
    seen = []
    hook = model.diffusion_model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    window = [2, 3, 4]
    t = torch.tensor([500.0])
    windowed = model.diffusion_model(
        whole[:, :, window], t, embeds, transformer_options={"context_window": ContextWindow(window)}, **conds
    )
    cut = {k: (v[:, :, window] if v.shape[2] == 6 else v) for k, v in conds.items()}
    direct = model.diffusion_model(whole[:, :, window], t, embeds, **cut)  # conditioning cut beforehand (ComfyUI 0.8)
    hook.remove()
    torch.testing.assert_close(windowed, direct, rtol=0, atol=0)
    name = "inpaint_latents" if kind == "InP" else "control_latents"
    got = seen[0][name]
    assert got.shape[2] == 3
    if kind == "InP":
        torch.testing.assert_close(got, latents[:, :, window], rtol=0, atol=0)
    else:
        torch.testing.assert_close(got[:, :16], latents[:, :16, window], rtol=0, atol=0)
        torch.testing.assert_close(got[:, 16:, :1], latents[:, 16:, :1], rtol=0, atol=0)
        assert not got[:, 16:, 1:].any()


def test_v5_control_with_a_reference_image_is_refused(nodes, control_folders):
    model = control_model(nodes, control_folders, "V5")
    [[embeds, extras]] = text_conditioning("V5")
    with pytest.raises(ValueError, match="V5 Control model takes no reference image.*disconnect ref_image"):
        model.extra_conds(
            cross_attn=embeds,
            noise=torch.zeros(1, 16, 2, 2, 4),
            easyanimate_control_latents=torch.zeros(1, 32, 2, 2, 4),
            **extras,
        )


def test_conditioning_for_another_video_size_is_refused_naming_both(nodes, tiny_folders):
    model = load_model(nodes, install(nodes, tiny_folders, "V5.1"))
    [[embeds, _]] = text_conditioning()
    with pytest.raises(ValueError, match="made for 5 frames at 32x16 but the latent to sample is 9 frames at 32x16"):
        model.extra_conds(
            cross_attn=embeds,
            noise=torch.zeros(1, 16, 3, 2, 4),
            easyanimate_inpaint_latents=torch.zeros(1, 17, 2, 2, 4),
        )


def test_conditioning_from_the_other_versions_text_encoder_is_refused(nodes, tiny_folders):
    model = load_model(nodes, install(nodes, tiny_folders, "V5"))
    [[embeds, _]] = text_conditioning("V5.1")  # no mT5 stream
    with pytest.raises(ValueError, match="V5 model needs the second \\(mT5\\) text stream"):
        model.extra_conds(cross_attn=embeds, noise=torch.zeros(1, 16, 2, 2, 4))
