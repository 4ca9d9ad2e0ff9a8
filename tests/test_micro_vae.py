"""The micro model's VAE by construction: the real mag VAE graph computes the pooling closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from easyanimate_core import load_vae
from easyanimate_core.micro import constructed_vae as cv
from easyanimate_core.micro import shipped_micro_model
from easyanimate_core.micro.data import ALL_COLOURS, Attributes, held_out_attributes, render, sample_clip
from easyanimate_core.micro.scoring import analyse
from easyanimate_core.micro.train_vae import reconstruction_scores

# The output GroupNorms' sigma depends on the signals by a relative sum(v^2) / c^2 (c = CONSTANT): ~1e-4 of
# values up to 2.6 (measured 1.6e-5 with c = 300).
CLOSED_FORM_TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def vae():
    return cv.constructed_vae()


def _clips(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    attributes = held_out_attributes()
    clips = [sample_clip(attributes[int(rng.integers(len(attributes)))], rng) for _ in range(n)]
    video = torch.from_numpy(np.stack([render(c) for c in clips])).float() / 127.5 - 1
    return video.permute(0, 4, 1, 2, 3)  # [B, 3, 17, 64, 64]


def test_closed_form_is_block_pooling_and_haar_details():
    """Hand-checkable cases: one pixel's value lands in its block's mean and the right quadrant's signs."""
    video = torch.zeros(1, 3, 5, 16, 16)
    video[0, 0, 1:5, 0, 0] = 64.0  # red, top-left pixel of block (0, 0), frames 1-4: latent frame 1
    latents = cv.closed_form_encode(video)
    assert latents.shape == (1, 16, 2, 2, 2)
    block = latents[0, :4, 1, 0, 0]  # red mean, dx, dy, dxy: the pixel is 1/16 of its 4x4 quadrant, 1/4 of the block
    assert torch.allclose(block, torch.tensor([1.0, cv.DETAIL_GAIN, cv.DETAIL_GAIN, cv.DETAIL_GAIN]))
    assert latents[0, :, 0].abs().max() == 0 and latents[0, :, 1, 1].abs().max() == 0
    assert latents[0, 4:].abs().max() == 0  # green, blue, no motion (on in all four frames), the spare channel
    decoded = cv.closed_form_decode(latents)
    assert decoded.shape == (1, 3, 5, 16, 16)
    assert torch.equal(decoded[0, 0, 1:, :8, :8], torch.ones(4, 8, 8))  # the block's mean over 8x8 pixels, 4 frames
    assert decoded[0, 0, 0].abs().max() == 0 and decoded[0, 0, 1:, 8:].abs().max() == 0


def test_motion_channels_hold_the_change_inside_each_latent_frame():
    """A block that lights up in frames 3-4 (the second half of latent frame 1) shows as positive motion there."""
    video = -torch.ones(1, 3, 9, 16, 16)
    video[0, 1, 3:5, 8:16, 0:8] = 1.0  # green, block (1, 0), frames 3 and 4
    latents = cv.closed_form_encode(video)
    motion = latents[0, 3 * cv.HAAR_KINDS : cv.USED_LATENTS]  # [3, T, h, w]
    assert motion[1, 1, 1, 0] == cv.MOTION_GAIN * 2.0  # (1 - (-1)) between the frame pairs' means
    assert motion.abs().sum() == motion[1, 1, 1, 0].abs()  # nothing anywhere else (latent 0, other blocks)
    assert latents[0, cv.USED_LATENTS :].abs().max() == 0


def test_vae_graph_computes_the_closed_form(vae):
    video = _clips(2)
    mean, logvar = vae.encode(video)
    assert (mean - cv.closed_form_encode(video)).abs().max() < CLOSED_FORM_TOLERANCE
    assert torch.all(logvar == cv.LOGVAR)  # posterior samples are the means
    latents = torch.randn(2, 16, 5, 8, 8) * 0.5
    assert (vae.decode(latents) - cv.closed_form_decode(latents)).abs().max() < CLOSED_FORM_TOLERANCE


def test_chunked_encode_and_decode_equal_the_whole_clip(vae):
    """The pack decodes in temporal chunks (and the trainer encodes frame 0 alone): same numbers."""
    video = _clips(1, seed=1)
    whole, _ = vae.encode(video)
    chunked, _ = vae.encode(video, chunk_frames=8)
    assert (whole - chunked).abs().max() < 1e-6
    assert (vae.decode(whole) - vae.decode(whole, chunk_latents=2)).abs().max() < 1e-6


def test_latent_groups_depend_on_their_own_frames_only(vae):
    """Causal and group-local: changing frames 5-8 changes latent frame 2 and no other."""
    video = _clips(1, seed=2)
    changed = video.clone()
    changed[:, :, 5:9] = -1.0
    a, _ = vae.encode(video)
    b, _ = vae.encode(changed)
    differs = (a - b).abs().amax(dim=(0, 1, 3, 4)) > CLOSED_FORM_TOLERANCE
    assert differs.tolist() == [False, False, True, False, False]


def test_shipped_form_scores_every_held_out_reconstruction_right(tmp_path):
    """The folder the recipe ships: its reconstructions of held-out clips keep colour, motion and one object."""
    cv.write_vae_folder(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    assert 2.0 < loaded.config.scaling_factor < 6.0  # 1 / std of the latents (3.66 measured)
    scores = reconstruction_scores(tmp_path / "vae", clips=6)
    assert scores["colour_ok"] == scores["direction_ok"] == scores["speed_ok"] == 1.0
    assert scores["one_object_frames"] == 1.0
    assert scores["psnr_db"] > 24.0  # 26.3 dB on 32 clips: 8x8 block means of anti-aliased shapes


def test_every_palette_colour_and_background_survives(vae):
    """A static frame of each colour on each background decodes to its block means (no clipping, no drift)."""
    for background in ("black", "gray", "navy", "brown"):
        clip = sample_clip(Attributes("square", "white", "left", "slowly", background), np.random.default_rng(3))
        video = torch.from_numpy(render(clip)).float()[None].permute(0, 4, 1, 2, 3) / 127.5 - 1
        mean, _ = vae.encode(video)
        decoded = vae.decode(mean)
        expected = cv.closed_form_decode(cv.closed_form_encode(video))
        assert (decoded - expected).abs().max() < 2 * CLOSED_FORM_TOLERANCE


def test_every_colour_on_every_background_is_named_right_after_reconstruction():
    """The VAE's 8 x 8 block means blend small shapes into the background; the scorers still name every colour,
    the LoRA's cyan included (the colour ceiling of anything generated through this VAE)."""
    rng = np.random.default_rng(11)
    for colour in ALL_COLOURS:
        for background in ("black", "gray", "navy", "brown"):
            clip = sample_clip(Attributes("triangle", colour, "up", "slowly", background), rng)
            video = torch.from_numpy(render(clip)).float()[None].permute(0, 4, 1, 2, 3) / 127.5 - 1
            decoded = cv.closed_form_decode(cv.closed_form_encode(video))[0].permute(1, 2, 3, 0)
            assert analyse((decoded.clamp(-1, 1) + 1) / 2).colour == colour, (colour, background)


def test_the_shipped_vae_is_the_constructed_one():
    """The bundled model's vae/ holds exactly the constructed weights and the recipe's scaling factor."""
    root = shipped_micro_model()
    if root is None:
        pytest.skip("easyanimate_core/micro_model/ has no weights in this checkout")
    from safetensors.torch import load_file

    shipped = load_file(root / "vae" / "diffusion_pytorch_model.safetensors")
    expected = cv.constructed_state_dict()
    assert shipped.keys() == expected.keys()
    assert all(torch.equal(shipped[k], expected[k]) for k in expected)
    assert load_vae(root).config.scaling_factor == round(cv.scaling_factor(), 5)


def test_a_vae_loaded_under_inference_mode_skips_its_zero_branches_too(tmp_path):
    """ComfyUI runs nodes under torch.inference_mode: the weights are inference tensors (no version counter)."""
    cv.write_vae_folder(tmp_path / "vae")
    video = _clips(1, seed=4)
    with torch.inference_mode():
        vae = load_vae(tmp_path / "vae")
        mean, _ = vae.encode(video)
        decoded = vae.decode(mean)
    assert (mean - cv.closed_form_encode(video)).abs().max() < CLOSED_FORM_TOLERANCE
    assert (decoded - cv.closed_form_decode(mean)).abs().max() < CLOSED_FORM_TOLERANCE
