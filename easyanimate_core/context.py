"""Long videos in one sampling run: context windows over the latent time axis, and RIFLEx for a little more.

    ContextWindows(length=13, overlap=4)                 windows of latent frames, shared frames between neighbours
    context_windows_for_frames(frames=49, overlap=16)    the same from video frames (the CLI's flags), checked
    ContextWindows.spans(total) -> [range, ...]          which latent frames each window covers
    predict_in_windows(predict, x, time_inputs, windows) one model prediction stitched from the windows
    riflex_frequency(head_dim, trained_frames, frames)   (index, new frequency) of RIFLEx's temporal RoPE change

Every sampling step predicts each window on its own (the latents, and every conditioning latent with a time
axis cut to the same frames) and blends the predictions where windows overlap, with weights that fall off
linearly towards a window's inner edge, so each latent frame is mostly what the window that sees it in the
middle says. Neighbours share ``overlap`` latent frames at every step, which keeps objects and motion
continuous from window to window.

Latent-frame arithmetic of the mag VAE (4x in time, frame 0 alone): F video frames are (F - 1) / 4 + 1 latent
frames; a window of 49 frames is 13 latent frames, an overlap of 16 frames 4 latent frames. 145 frames (37 latent
frames) in 49-frame windows overlapping by 16 frames: 4 windows starting at latent frames 0, 9, 18 and 24 (the last
is moved back to end with the clip).

Choices, and why:
* RoPE restarts at 0 in every window: the models were trained on clips of at most 49 frames, so positions past
  13 latent frames are never seen in training.
* A window that starts after latent frame 0 takes its first latent, which stands for 4 video frames, where
  training always had the causal first frame (one image). Keeping latent frame 0 in every window instead
  would put two frames far apart next to each other in time, which the model reads as a jump; the overlap
  blend makes the first latent of a later window matter little (its weight is the smallest in that window).
* Start / end images (InP): their latents sit in the first / last latent frame of the clip, so only the first /
  last window sees them; the windows in between are text-to-video windows continued by the overlap.
* A V5.1 Control model's reference image is given to every window at its first frame (reference_at_first_frame);
  the control video is cut like the latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ContextWindows:
    """Overlapping windows of ``length`` latent frames; neighbours share at least ``overlap`` latent frames."""

    length: int
    overlap: int

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"a context window needs at least 1 latent frame, got {self.length}")
        if not 0 <= self.overlap < self.length:
            raise ValueError(
                f"the context overlap ({self.overlap} latent frames) must be at least 0 and shorter than the "
                f"window ({self.length} latent frames)"
            )

    def spans(self, total: int) -> list[range]:
        """The latent frames of each window over a clip of ``total`` latent frames (one window if it fits)."""
        if total <= self.length:
            return [range(total)]
        stride = self.length - self.overlap
        starts = list(range(0, total - self.length, stride)) + [total - self.length]
        return [range(s, s + self.length) for s in starts]

    def weights(self, span: range, total: int) -> torch.Tensor:
        """Blend weights [len(span)] of a window: rising over ``overlap`` + 1 frames from an inner start edge, falling
        towards an inner end edge; 1 in the middle and at the clip's own ends."""
        n = len(span)
        position = torch.arange(n, dtype=torch.float32)
        ramp = float(self.overlap + 1)
        rise = torch.ones(n) if span.start == 0 else ((position + 1) / ramp).clamp(max=1)
        fall = torch.ones(n) if span.stop == total else ((n - position) / ramp).clamp(max=1)
        return torch.minimum(rise, fall)


def context_windows_for_frames(frames: int, overlap: int, temporal_compression: int = 4) -> ContextWindows:
    """Windows given in video frames (``frames`` = 4k + 1, ``overlap`` a multiple of 4) as latent frames."""
    c = temporal_compression
    if frames < 1 or (frames - 1) % c:
        low = (max(frames, 1) - 1) // c * c + 1
        raise ValueError(
            f"--context-frames {frames}: a window must be {c}k + 1 video frames (one latent frame per {c}); "
            f"use {low} or {low + c}"
        )
    if overlap < 0 or overlap % c:
        raise ValueError(
            f"--context-overlap {overlap}: the overlap must be a multiple of {c} video frames (whole latent "
            f"frames); use {max(overlap, 0) // c * c} or {max(overlap, 0) // c * c + c}"
        )
    length, shared = (frames - 1) // c + 1, overlap // c
    if shared >= length:
        raise ValueError(
            f"--context-overlap {overlap} must be shorter than --context-frames {frames} (at most {(length - 1) * c})"
        )
    return ContextWindows(length, shared)


def cut_in_time(name: str, value: torch.Tensor, span: range) -> torch.Tensor:
    """A conditioning latent [B, C, T, h, w] cut to a window's latent frames (the default of predict_in_windows)."""
    return value[:, :, span.start : span.stop]


def reference_at_first_frame(reference: torch.Tensor, frames: int) -> torch.Tensor:
    """A V5.1 Control model's reference-image slot over ``frames`` latent frames: the reference's latent [B, C, 1, h, w]
    at frame 0, zeros after (as the official pipeline feeds it). Every context window gets it at its own first
    frame: the reference says what things look like, not when."""
    padding = reference.new_zeros(*reference.shape[:2], frames - 1, *reference.shape[3:])
    return torch.cat([reference[:, :, :1], padding], dim=2)


def predict_in_windows(
    predict: Callable[[torch.Tensor, dict[str, torch.Tensor], range], torch.Tensor],
    x: torch.Tensor,
    time_inputs: dict[str, torch.Tensor],
    windows: ContextWindows,
    cut: Callable[[str, torch.Tensor, range], torch.Tensor] = cut_in_time,
) -> torch.Tensor:
    """``predict(x_window, inputs_window, span)`` over each window of ``x`` [B, C, T, h, w], blended: [B, C', T, h, w].

    ``time_inputs`` (inpaint / control latents [B, C_i, T, h, w]) are cut to each window by ``cut(name, value,
    span)``: the same latent frames as ``x`` by default.
    """
    total = x.shape[2]
    spans = windows.spans(total)
    if len(spans) == 1:
        return predict(x, time_inputs, spans[0])
    out = weight_sum = None
    for span in spans:
        pred = predict(x[:, :, span.start : span.stop], {k: cut(k, v, span) for k, v in time_inputs.items()}, span)
        w = windows.weights(span, total).to(pred.device, pred.dtype)[:, None, None]  # [t, 1, 1]
        if out is None:
            out = pred.new_zeros(*pred.shape[:2], total, *pred.shape[3:])
            weight_sum = pred.new_zeros(total, 1, 1)
        out[:, :, span.start : span.stop] += pred * w
        weight_sum[span.start : span.stop] += w
    return out / weight_sum


def riflex_frequency(head_dim: int, trained_frames: int, frames: int, theta: float = 10000.0) -> tuple[int, float]:
    """RIFLEx (Zhao et al., 2025) for the temporal RoPE of ``head_dim`` // 4 channels: (index, new frequency).

    The intrinsic frequency is the temporal component whose period (2 pi / frequency, in latent frames) is
    nearest the trained length ``trained_frames``: it is the one that repeats the motion when a clip runs past
    its period. Its frequency is lowered to 0.9 * 2 pi / ``frames``, so the whole clip stays inside 90% of one
    period (RIFLEx's margin against repeats at the tail); the other components are unchanged.
    """
    dim = head_dim // 4
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    periods = 2 * math.pi / freqs
    index = int((periods - trained_frames).abs().argmin())
    return index, min(float(freqs[index]), 0.9 * 2 * math.pi / frames)
