"""Long videos: context windows over latent frames, the pipeline run in windows, RIFLEx's RoPE change."""

from __future__ import annotations

import math

import pytest
import torch

from easyanimate_core import long_video
from easyanimate_core.context import (
    ContextWindows,
    context_windows_for_frames,
    predict_in_windows,
    riflex_frequency,
)
from easyanimate_core.long_video import part_spans
from easyanimate_core.pipeline import generate
from easyanimate_core.sampling import make_sampler
from easyanimate_core.text_encoders import PromptEmbeds, PromptPair
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig, rope_3d
from easyanimate_core.vae import MagvitVAE, VAEConfig

LATENT, TEXT_WIDTH = 4, 8
FRAMES, HEIGHT, WIDTH = 29, 16, 16  # 8 latent frames
VAE_CONFIG = dict(latent_channels=LATENT, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)


def test_windows_cover_the_clip_in_order_and_the_last_ends_with_it():
    windows = ContextWindows(length=13, overlap=4)
    spans = windows.spans(37)  # 145 frames in 49-frame windows overlapping by 16 frames (the CLI's --help)
    assert [s.start for s in spans] == [0, 9, 18, 24]
    assert all(len(s) == 13 for s in spans) and spans[-1].stop == 37
    assert set().union(*map(set, spans)) == set(range(37))
    assert all(len(set(a) & set(b)) >= 4 for a, b in zip(spans, spans[1:], strict=False))
    assert windows.spans(13) == [range(13)] and windows.spans(5) == [range(5)]


def test_blend_weights_fall_towards_inner_edges_only():
    windows = ContextWindows(length=6, overlap=2)
    first, middle, last = (
        windows.weights(range(0, 6), 14),
        windows.weights(range(4, 10), 14),
        windows.weights(range(8, 14), 14),
    )
    assert first.tolist() == pytest.approx([1, 1, 1, 1, 2 / 3, 1 / 3])
    assert middle.tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3])
    assert last.tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])


def test_a_prediction_that_ignores_windows_comes_back_unchanged():
    """Blending normalises the weights: a per-frame prediction is the same whatever the windows."""
    x = torch.randn(2, 3, 11, 4, 4)
    cond = torch.randn(2, 1, 11, 4, 4)
    calls = []

    def predict(xw, inputs, span):
        assert len(span) == xw.shape[2]
        calls.append(xw.shape[2])
        return xw * 2 + inputs["inpaint_latents"]

    out = predict_in_windows(predict, x, {"inpaint_latents": cond}, ContextWindows(5, 2))
    assert torch.allclose(out, x * 2 + cond, atol=1e-6)
    assert calls == [5, 5, 5]  # windows at latent frames 0, 3, 6


@pytest.mark.parametrize(
    ("frames", "overlap", "message"),
    [
        (48, 16, r"--context-frames 48: a window must be 4k \+ 1 video frames.*use 45 or 49"),
        (49, 6, r"--context-overlap 6: the overlap must be a multiple of 4.*use 4 or 8"),
        (17, 20, r"--context-overlap 20 must be shorter than --context-frames 17 \(at most 16\)"),
        (49, -4, r"--context-overlap -4"),
    ],
)
def test_window_sizes_in_frames_are_checked_with_the_fix(frames, overlap, message):
    with pytest.raises(ValueError, match=message):
        context_windows_for_frames(frames, overlap)
    assert context_windows_for_frames(49, 16) == ContextWindows(13, 4)


def test_riflex_lowers_the_frequency_whose_period_is_nearest_the_trained_length():
    # head_dim 128: 16 temporal frequencies 10000^(-j/16); periods 6.3, 11.2, 19.9, 35.3, ... latent frames.
    index, frequency = riflex_frequency(128, trained_frames=13, frames=37)
    assert index == 1
    assert frequency == pytest.approx(0.9 * 2 * math.pi / 37)
    assert riflex_frequency(128, trained_frames=20, frames=37)[0] == 2
    # Never raised: a clip shorter than 0.9 of the period keeps the original frequency.
    assert riflex_frequency(128, 13, 5)[1] == pytest.approx(10000 ** (-1 / 16))

    plain = rope_3d(37, 2, 2, 128, 2, 2)
    changed = rope_3d(37, 2, 2, 128, 2, 2, temporal_frequency=(index, frequency))
    cos_plain, cos_changed = plain[0].view(37, 4, 128), changed[0].view(37, 4, 128)
    differs = (cos_plain - cos_changed).abs().amax(dim=(0, 1)) > 1e-6
    assert differs.nonzero().flatten().tolist() == [2 * index, 2 * index + 1]  # one interleaved temporal pair
    # Within one period: the changed component never comes back to its start over the clip.
    angles = torch.arange(37) * frequency
    assert angles.max() < 2 * math.pi


def tiny_parts(in_channels: int) -> tuple[EasyAnimateTransformer3D, MagvitVAE]:
    torch.manual_seed(0)
    config = TransformerConfig(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=in_channels,
        out_channels=LATENT,
        patch_size=2,
        num_layers=2,
        mmdit_layers=2,
        time_embed_dim=8,
        text_embed_dim=TEXT_WIDTH,
    )
    transformer = EasyAnimateTransformer3D(config)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    vae = MagvitVAE(VAEConfig.from_dict(VAE_CONFIG))
    return transformer.eval(), vae.eval()


def prompts() -> PromptPair:
    g = torch.Generator().manual_seed(3)
    embeds = [PromptEmbeds(torch.randn(1, 6, TEXT_WIDTH, generator=g), torch.ones(1, 6)) for _ in range(2)]
    return PromptPair(*embeds)


def run(transformer, vae, **kw) -> torch.Tensor:
    return generate(
        transformer,
        vae,
        prompts(),
        make_sampler("Flow", "V5.1", 3),
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        guidance=5.0,
        seed=4,
        decode=False,
        **kw,
    )


class CallRecorder:
    """Records the latent frames and the extra inputs of every transformer call."""

    def __init__(self, transformer):
        self.calls, self.batch_sizes = [], []
        self.handle = transformer.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append((args[0].shape[2], {k: v for k, v in kwargs.items() if k.endswith("_latents")}))
        self.batch_sizes.append(args[0].shape[0])


def test_one_window_as_long_as_the_clip_is_an_ordinary_run():
    transformer, vae = tiny_parts(LATENT)
    ordinary = run(transformer, vae)
    assert torch.equal(run(transformer, vae, context=ContextWindows(8, 2)), ordinary)


def test_text_to_video_in_windows_calls_the_model_on_windows_only():
    transformer, vae = tiny_parts(LATENT)
    recorder = CallRecorder(transformer)
    windowed = run(transformer, vae, context=ContextWindows(4, 2))
    assert windowed.shape[2] == 8 and torch.isfinite(windowed).all()
    assert {frames for frames, _ in recorder.calls} == {4}
    assert len(recorder.calls) == 3 * 3  # 3 steps x windows at latent frames 0, 2, 4
    assert not torch.allclose(windowed, run(transformer, vae))


def test_image_to_video_in_windows_gives_the_start_image_to_the_first_window_and_the_end_image_to_the_last():
    transformer, vae = tiny_parts(2 * LATENT + 1)
    g = torch.Generator().manual_seed(8)
    images = {
        "start_image": torch.rand(HEIGHT, WIDTH, 3, generator=g),
        "end_image": torch.rand(HEIGHT, WIDTH, 3, generator=g),
    }
    full = whole_clip_input(transformer, vae, "inpaint_latents", **images)
    recorder = CallRecorder(transformer)
    run(transformer, vae, context=ContextWindows(4, 2), **images)
    for (_, inputs), start in zip(recorder.calls[:3], (0, 2, 4), strict=True):  # the first step's windows
        assert torch.equal(inputs["inpaint_latents"][:1], full[:, :, start : start + 4])
    nothing_kept = full[:, :, 3]  # a latent frame between the images
    assert not torch.equal(full[:, :, 0], nothing_kept) and not torch.equal(full[:, :, -1], nothing_kept)


def test_control_video_in_windows_cuts_the_control_and_gives_every_window_the_reference():
    transformer, vae = tiny_parts(3 * LATENT)  # V5.1 Control: noise, control video, reference image
    recorder = CallRecorder(transformer)
    g = torch.Generator().manual_seed(9)
    control = torch.rand(FRAMES, HEIGHT, WIDTH, 3, generator=g)
    ref = torch.rand(HEIGHT, WIDTH, 3, generator=g)
    run(transformer, vae, context=ContextWindows(4, 2), control_video=control, ref_image=ref)
    full = whole_clip_input(transformer, vae, "control_latents", control_video=control, ref_image=ref)
    for (_, inputs), start in zip(recorder.calls[:3], (0, 2, 4), strict=True):
        window = inputs["control_latents"][:1]  # the unconditional half of the batch equals the conditional
        assert torch.equal(window[:, :LATENT], full[:, :LATENT, start : start + 4])
        assert torch.equal(window[:, LATENT:, :1], full[:, LATENT:, :1])  # the reference at the window's frame 0
        assert not window[:, LATENT:, 1:].any()


def whole_clip_input(transformer, vae, name: str, **inputs) -> torch.Tensor:
    """The whole clip's conditioning latents ``name`` as an ordinary run's first call sees them."""
    recorder = CallRecorder(transformer)
    run(transformer, vae, **inputs)
    recorder.handle.remove()
    return recorder.calls[0][1][name][:1]


def test_riflex_changes_a_pass_longer_than_the_trained_length_only():
    transformer, vae = tiny_parts(LATENT)
    ordinary = run(transformer, vae)
    assert torch.equal(run(transformer, vae, riflex_trained_frames=FRAMES), ordinary)  # no longer than trained
    assert not torch.equal(run(transformer, vae, riflex_trained_frames=9), ordinary)  # 3 latent frames trained


def test_parts_start_where_the_last_one_ends_minus_the_overlap_and_the_last_ends_with_the_clip():
    assert part_spans(145, 49, 16) == [(0, 49), (33, 49), (66, 49), (96, 49)]
    assert part_spans(49, 49, 16) == [(0, 49)] and part_spans(17, 49, 16) == [(0, 17)]


def test_each_part_continues_from_the_last_parts_final_frames_and_the_end_image_goes_to_the_last():
    transformer, vae = tiny_parts(2 * LATENT + 1)
    g = torch.Generator().manual_seed(8)
    start, end = torch.rand(HEIGHT, WIDTH, 3, generator=g), torch.rand(HEIGHT, WIDTH, 3, generator=g)
    kept = []
    original = long_video.generate

    def spy(*args, **kwargs):
        kept.append((kwargs["frames"], kwargs["start_image"], kwargs["end_image"]))
        out = original(*args, **kwargs)
        kept[-1] += (out,)
        return out

    long_video.generate = spy
    try:
        clip = long_video.generate_in_parts(
            transformer,
            vae,
            prompts(),
            make_sampler("Flow", "V5.1", 2),
            frames=41,
            part_frames=17,
            overlap=8,
            height=HEIGHT,
            width=WIDTH,
            guidance=5.0,
            seed=4,
            start_image=start,
            end_image=end,
        )
    finally:
        long_video.generate = original
    assert clip.shape == (41, HEIGHT, WIDTH, 3)
    assert [frames for frames, *_ in kept] == [17] * 4  # parts at frames 0, 9, 18 and 24 (moved back to end at 41)
    assert kept[0][1] is start and kept[-1][2] is end and all(k[2] is None for k in kept[:-1])
    parts = [part for *_, part in kept]
    assert torch.equal(kept[1][1], parts[0][9:])  # the previous part's last 8 frames, kept
    assert torch.equal(kept[2][1], parts[1][9:])
    # The last part continues from 11 frames: 3 of them cross-faded already, then the third part's last 8.
    assert len(kept[3][1]) == 11 and torch.equal(kept[3][1][3:], parts[2][9:])
    assert torch.equal(clip[:9], parts[0][:9]) and torch.equal(clip[-6:], parts[3][-6:])
    torch.testing.assert_close(clip[9], parts[0][9])  # the cross-fade starts on the old frames ...
    torch.testing.assert_close(clip[16], parts[0][16] / 8 + parts[1][7] * 7 / 8)  # ... and ends near the new
