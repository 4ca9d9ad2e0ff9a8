"""Clips longer than one pass, made in parts that each continue the last (InP models; the official long-video mode).

    part_spans(frames=145, part_frames=49, overlap=16) -> [(0, 49), (33, 49), (66, 49), (96, 49)]
    generate_in_parts(transformer, vae, prompts, sampler, frames=145, part_frames=49, overlap=16, ...)
        -> frames [F, H, W, 3] in [0, 1]

EasyAnimate's own "Long Video Generation" (its web UI) makes a long clip part by part: each part is an
image-to-video run whose kept first frames are the previous part's last ``overlap`` frames, and the overlap is
cross-faded linearly from the old frames to the new. The start image goes to the first part, the end image to the
last. Unlike context windows (``easyanimate_core.context``), which denoise all windows together and blend
predictions, every part here sees real pixels of the part before, so an object keeps its place and motion
across parts; it needs an InP model, and the VAE decodes and re-encodes each overlap.

Differences from the official loop, and why: the last part is moved back to end exactly at ``frames`` (the official
loop shortens it and may return fewer frames than asked), so it continues from more than ``overlap`` frames; part
``i`` draws its noise from ``seed + i``.
"""

from __future__ import annotations

import copy

import torch

from .pipeline import ProgressFn, generate
from .vae import MagvitVAE


def part_spans(frames: int, part_frames: int, overlap: int) -> list[tuple[int, int]]:
    """(first frame, frame count) of each part of a ``frames``-frame clip; one part when it fits."""
    if frames <= part_frames:
        return [(0, frames)]
    stride = part_frames - overlap
    starts = list(range(0, frames - part_frames, stride)) + [frames - part_frames]
    return [(start, part_frames) for start in starts]


def generate_in_parts(
    transformer,
    vae: MagvitVAE,
    prompts,
    sampler,
    *,
    frames: int,
    part_frames: int,
    overlap: int,
    seed: int = 0,
    start_image: torch.Tensor | None = None,
    end_image: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
    **settings,
) -> torch.Tensor:
    """A ``frames``-frame clip in parts of ``part_frames`` that overlap by at least ``overlap`` frames (module
    docstring). ``settings`` go to every part's ``pipeline.generate`` (height, width, guidance, device, ...)."""
    spans = part_spans(frames, part_frames, overlap)
    steps = sampler.num_steps
    clip, done = None, 0  # [F, H, W, 3], filled up to frame ``done``
    for i, (start, length) in enumerate(spans):
        last = i == len(spans) - 1
        kept = start_image if clip is None else clip[start:done].clone()  # the frames this part continues
        part = generate(
            transformer,
            vae,
            prompts,
            copy.deepcopy(sampler),  # a sampler may keep state across steps (PNDM's history)
            frames=length,
            seed=seed + i,
            start_image=kept,
            end_image=end_image if last else None,
            progress=(lambda done, total, i=i: progress(i * steps + done, len(spans) * steps)) if progress else None,
            **settings,
        )
        if clip is None:
            clip = part.new_empty(frames, *part.shape[1:])  # written in place: one copy of the clip in memory
            clip[:length] = part
            done = length
            continue
        shared = done - start
        fade = (torch.arange(shared, dtype=part.dtype) / shared)[:, None, None, None]  # 0 -> old frames, 1 -> new
        clip[start:done].mul_(1 - fade).add_(part[:shared] * fade)
        clip[done : start + length] = part[shared:]
        done = start + length
    return clip
