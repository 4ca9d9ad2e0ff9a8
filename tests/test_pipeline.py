"""Generation pipelines: parity with diffusers' EasyAnimate pipelines on tiny random components."""

from __future__ import annotations

import pytest
import torch

from easyanimate_core.keys import diffusers_to_official
from easyanimate_core.pipeline import generate, resize_mask, snap_size
from easyanimate_core.sampling import make_sampler
from easyanimate_core.text_encoders import load_text_encoders
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig
from easyanimate_core.vae import MagvitVAE, VAEConfig
from tests.tiny_text_models import write_tiny_v51_text_encoder

diffusers = pytest.importorskip("diffusers", reason="diffusers is the parity reference (pip install -e '.[test]')")

LATENT = 4
FRAMES, HEIGHT, WIDTH, STEPS = 5, 32, 64, 3
VAE_CONFIG = dict(latent_channels=LATENT, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="module")
def text_root(tmp_path_factory):
    return write_tiny_v51_text_encoder(tmp_path_factory.mktemp("text"))


def reference_parts(text_root, in_channels: int):
    """diffusers transformer, VAE, scheduler and text encoder, with every weight random and visible."""
    torch.manual_seed(0)
    text_encoder = diffusers_text_encoder(text_root)
    transformer = diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=in_channels,
        out_channels=LATENT,
        patch_size=2,
        num_layers=2,
        mmdit_layers=1,
        time_embed_dim=8,
        text_embed_dim=text_encoder.config.text_config.hidden_size,
        add_norm_text_encoder=True,
    ).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    vae = diffusers.AutoencoderKLMagvit(**VAE_CONFIG).eval()
    vae.register_to_config(cache_mag_vae=True)  # the inpaint pipeline reads this original-repo key
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    return transformer, vae, scheduler, text_encoder


def diffusers_text_encoder(text_root):
    import transformers

    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(text_root / "text_encoder").eval()


def ours_from(transformer, vae):
    """Our transformer and VAE carrying the reference's weights.

    compat="diffusers" reproduces diffusers 0.42's RoPE positions (which differ from the code the
    released weights were trained with when the token grid does not fill the base grid, as here) and
    its unprojected single-stream text; the CLI and nodes run the official behaviour."""
    ours = EasyAnimateTransformer3D(TransformerConfig.from_dict(dict(transformer.config)), compat="diffusers")
    ours.load_state_dict({diffusers_to_official(k): v for k, v in transformer.state_dict().items()})
    our_vae = MagvitVAE(VAEConfig.from_dict(VAE_CONFIG))
    our_vae.load_state_dict(vae.state_dict())
    return ours.eval(), our_vae.eval()


def reference_frames(out) -> torch.Tensor:
    """diffusers' output (output_type="pt") as [F, H, W, 3]."""
    video = out.frames[0] if hasattr(out, "frames") else out[0][0]
    return video.permute(0, 2, 3, 1).float()


def assert_frames_close(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"max|ours - diffusers| = {err:.3g} > 1e-4"
    assert ref.std() > 0.01, "degenerate reference video: the comparison would prove nothing"
    print(f"max|ours - diffusers| = {err:.3g}, reference std {ref.std():.3g}")


def run_reference(pipe, prompt: str, guidance: float, seed: int, **kw):
    """diffusers' pipeline at the shared tiny size and step count."""
    return pipe(
        prompt,
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def run_ours(transformer, vae, prompts, guidance: float, seed: int, steps: int = STEPS, **kw):
    """Our pipeline at the shared tiny size with the V5.1 Flow sampler."""
    sampler = make_sampler("Flow", "V5.1", steps)
    return generate(
        transformer,
        vae,
        prompts,
        sampler,
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        guidance=guidance,
        seed=seed,
        **kw,
    )


def test_text_to_video_matches_diffusers_pipeline(text_root):
    transformer, vae, scheduler, text_encoder = reference_parts(text_root, LATENT)
    tokenizer = load_text_encoders(text_root, "v5.1").tokenizer
    pipe = diffusers.EasyAnimatePipeline(vae, text_encoder, tokenizer, transformer, scheduler)
    prompt, negative = "a red circle moving right", "blurry"
    ref = run_reference(pipe, prompt, 6.0, 7, negative_prompt=negative, output_type="pt")
    ours, our_vae = ours_from(transformer, vae)
    prompts = load_text_encoders(text_root, "v5.1").encode(prompt, negative)
    frames = run_ours(ours, our_vae, prompts, 6.0, 7)
    assert_frames_close(frames, reference_frames(ref))


def image(seed: int) -> torch.Tensor:
    return torch.rand(HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("with_end", [False, True], ids=["start", "start+end"])
def test_image_to_video_matches_diffusers_inpaint_pipeline(text_root, with_end):
    transformer, vae, scheduler, text_encoder = reference_parts(text_root, 2 * LATENT + 1)
    tokenizer = load_text_encoders(text_root, "v5.1").tokenizer
    pipe = diffusers.EasyAnimateInpaintPipeline(vae, text_encoder, tokenizer, transformer, scheduler)
    start, end = image(1), image(2) if with_end else None
    # The official helper's inputs: the start image tiled over all frames, the end image last;
    # mask 0 = keep, 255 = generate.
    video = start.permute(2, 0, 1)[None, :, None].repeat(1, 1, FRAMES, 1, 1)
    mask = torch.full((1, 1, FRAMES, HEIGHT, WIDTH), 255.0)
    mask[:, :, 0] = 0
    if with_end:
        video[:, :, -1] = end.permute(2, 0, 1)
        mask[:, :, -1] = 0
    ref = run_reference(
        pipe, "a blue square", 5.0, 3, video=video, mask_video=mask, negative_prompt="", output_type="pt"
    )
    ours, our_vae = ours_from(transformer, vae)
    prompts = load_text_encoders(text_root, "v5.1").encode("a blue square", "")
    frames = run_ours(ours, our_vae, prompts, 5.0, 3, start_image=start, end_image=end)
    assert_frames_close(frames, reference_frames(ref))


def test_resize_mask_keeps_frame_zero_apart():
    mask = torch.zeros(1, 1, 9, 16, 16)
    mask[:, :, 0] = 1
    out = resize_mask(mask, (1, 4, 3, 2, 2), first_frame_alone=True)
    assert torch.equal(out[:, :, 0], torch.ones(1, 1, 2, 2)) and torch.equal(out[:, :, 1:], torch.zeros(1, 1, 2, 2, 2))


def test_seed_reproduces_bit_for_bit_and_inputs_matter(text_root):
    transformer, vae, *_ = reference_parts(text_root, 2 * LATENT + 1)
    ours, our_vae = ours_from(transformer, vae)
    prompts = load_text_encoders(text_root, "v5.1").encode("a green triangle", "")

    def run(seed=5, start=None):
        return run_ours(ours, our_vae, prompts, 6.0, seed, steps=2, start_image=start)

    first = run()
    assert torch.equal(first, run())
    assert not torch.equal(first, run(seed=6))
    assert not torch.equal(run(start=image(1)), run(start=image(2)))


class ControlPipelineWithoutCrashes(diffusers.EasyAnimateControlPipeline if diffusers else object):
    """diffusers 0.42.1's control pipeline, minus its two crashes (spec diffusers_port.md §3): it passes
    ``text_encoder_index`` to an encode_prompt that has no such parameter, and has no decode_latents (so
    it runs with output_type="latent"). Neither workaround touches the math."""

    def encode_prompt(self, *args, text_encoder_index=None, **kwargs):
        return super().encode_prompt(*args, **kwargs)


@pytest.mark.parametrize("with_ref", [False, True], ids=["control", "control+ref"])
def test_control_path_matches_diffusers_control_pipeline_parts(text_root, with_ref):
    """Same control and reference latents, transformer inputs and steps: the final latents agree."""
    transformer, vae, scheduler, text_encoder = reference_parts(text_root, 3 * LATENT)
    tokenizer = load_text_encoders(text_root, "v5.1").tokenizer
    pipe = ControlPipelineWithoutCrashes(vae, text_encoder, tokenizer, transformer, scheduler)
    control = torch.rand(FRAMES, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(4))
    ref_image = image(9) if with_ref else None
    ref = run_reference(
        pipe,
        "a dancer",
        4.0,
        11,
        control_video=control.permute(3, 0, 1, 2)[None],
        ref_image=ref_image.permute(2, 0, 1)[None, :, None] if with_ref else None,
        negative_prompt="",
        output_type="latent",
    )
    ours, our_vae = ours_from(transformer, vae)
    prompts = load_text_encoders(text_root, "v5.1").encode("a dancer", "")
    latents = run_ours(ours, our_vae, prompts, 4.0, 11, control_video=control, ref_image=ref_image, decode=False)
    expected = ref.frames
    err = (latents - expected).abs().max().item()
    assert err <= 1e-5 * expected.abs().max().item(), f"max|ours - diffusers| = {err:.3g}"
    if with_ref:  # the reference image really reaches the model
        assert not torch.equal(latents, run_ours(ours, our_vae, prompts, 4.0, 11, control_video=control, decode=False))


def test_sequential_cfg_equals_batched_cfg(text_root):
    transformer, vae, *_ = reference_parts(text_root, LATENT)
    ours, our_vae = ours_from(transformer, vae)
    prompts = load_text_encoders(text_root, "v5.1").encode("a cat", "dark")
    batched = run_ours(ours, our_vae, prompts, 5.0, 2, steps=2, cfg_batched=True, decode=False)
    sequential = run_ours(ours, our_vae, prompts, 5.0, 2, steps=2, cfg_batched=False, decode=False)
    assert (batched - sequential).abs().max() <= 1e-5 * batched.abs().max()


def test_sizes_snap_with_a_warning_that_says_what_changed(caplog):
    vae = MagvitVAE(VAEConfig.from_dict(VAE_CONFIG), device="meta")
    with caplog.at_level("WARNING"):
        size = snap_size(50, 390, 680, vae)
    assert (size.frames, size.height, size.width) == (49, 384, 672)
    assert (
        "size 680x390 -> 672x384 (multiples of 16)" in caplog.text and "frames 50 -> 49 (must be 4k+1)" in caplog.text
    )
    caplog.clear()
    assert snap_size(49, 384, 672, vae) == size and not caplog.text


def test_inpaint_latents_of_a_batch_equal_those_of_each_clip():
    """The trainer encodes a micro-batch's masked clips in one VAE call; that must equal one call per clip."""
    from easyanimate_core.pipeline import encode_mean, inpaint_from_masked, inpaint_latents, masked_video

    torch.manual_seed(0)
    vae = MagvitVAE(VAEConfig.from_dict(VAE_CONFIG)).eval()
    clips = [torch.rand(1, 3, 9, 32, 32) * 2 - 1 for _ in range(4)]
    masks = [torch.ones(1, 1, 9, 32, 32) for _ in range(4)]  # 1 = generate
    masks[0].zero_()  # keep everything
    masks[1][:, :, :1] = 0  # image to video
    masks[2][:, :, [0, -1]] = 0  # start and end
    masks[3][..., 8:24, 4:20] = 0  # keep a box
    shape = (1, LATENT, 3, 4, 4)
    pairs = list(zip(clips, masks, strict=True))
    with torch.no_grad():
        one_by_one = [
            inpaint_latents(vae, c, m, shape, torch.Generator().manual_seed(i), 0.05, "cpu")
            for i, (c, m) in enumerate(pairs)
        ]
        masked = [masked_video(c, m, torch.Generator().manual_seed(i), 0.05) for i, (c, m) in enumerate(pairs)]
        latents = encode_mean(vae, torch.cat(masked), "cpu")
        batched = [inpaint_from_masked(vae, latents[i : i + 1], m, "cpu") for i, m in enumerate(masks)]
    for one, many in zip(one_by_one, batched, strict=True):
        torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)
    assert masked_video(clips[0], torch.ones_like(masks[0]), torch.Generator(), 0.05) is None  # nothing kept
