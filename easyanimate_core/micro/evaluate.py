"""Evaluating a micro model: generate from prompts and seeds through the real pipeline, score the frames.

    model = load_micro(root, lora=None)
    evaluate(model, cases, steps=25, guidance=6.0, image_to_video=False) -> (summary, rows)
    cases = eval_cases(held_out_attributes(), samples=64, first_seed=0)

Text-to-video scores colour, direction, speed, shape and one-object frames (``scoring.score``).
Image-to-video starts from frame 0 of a rendered clip of the same attributes (a held-out first frame:
the clip is drawn with a seed of its own, so it is not a training video) and scores the same things;
"continues the prompt's motion" is its direction rate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..loading import load_transformer, load_vae
from ..long_video import generate_in_parts
from ..lora import merge_lora, read_lora
from ..pipeline import generate
from ..sampling import make_sampler
from ..step_cache import StepCache, model_coefficients
from ..text_encoders import TextEncoders, load_text_encoders
from ..transformer import EasyAnimateTransformer3D
from ..vae import MagvitVAE
from . import scoring
from .data import FRAMES, SIZE, Attributes, render_frame, sample_clip

# Seeds of the start images of image-to-video cases: far from the training data's seeds (0..).
START_IMAGE_SEED = 1_000_000


@dataclass
class MicroModel:
    """A loaded micro model (text encoder, transformer, VAE)."""

    text: TextEncoders
    transformer: EasyAnimateTransformer3D
    vae: MagvitVAE
    root: Path | None = None  # the model folder (its step_cache.json)


@dataclass(frozen=True)
class Case:
    """One evaluation sample: what to ask for and the seed of the generation."""

    attributes: Attributes
    seed: int


def load_micro(root: str | Path, lora: str | Path | None = None, lora_strength: float = 1.0) -> MicroModel:
    """Load a micro model folder in float32 on the CPU, with ``lora`` merged into the transformer if given."""
    transformer = load_transformer(root, dtype=torch.float32)
    if lora is not None:
        merge_lora(transformer, read_lora(lora, transformer), lora_strength)
    text = load_text_encoders(root, dtype=torch.float32)
    return MicroModel(text, transformer, load_vae(root, dtype=torch.float32), Path(root))


def eval_cases(attributes: list[Attributes], samples: int, first_seed: int = 0) -> list[Case]:
    """``samples`` cases cycling through ``attributes`` (spread evenly when fewer), each with its own seed."""
    if not attributes:
        raise ValueError("no attributes to evaluate")
    if samples < len(attributes):
        picks = np.linspace(0, len(attributes) - 1, samples).round().astype(int)
        chosen = [attributes[i] for i in picks]
    else:
        chosen = [attributes[i % len(attributes)] for i in range(samples)]
    return [Case(a, first_seed + i) for i, a in enumerate(chosen)]


def start_image(case: Case) -> torch.Tensor:
    """Frame 0 of a rendered clip of ``case.attributes`` ([H, W, 3] in [0, 1]), drawn with its own seed."""
    clip = sample_clip(case.attributes, np.random.default_rng(START_IMAGE_SEED + case.seed))
    return torch.from_numpy(render_frame(clip, 0)).float() / 255


def generate_case(
    model: MicroModel,
    case: Case,
    steps: int,
    guidance: float,
    image_to_video: bool = False,
    frames: int = FRAMES,
    parts: tuple[int, int] | None = None,
    **options,
) -> torch.Tensor:
    """Frames [F, H, W, 3] in [0, 1] for ``case`` (text-to-video, or image-to-video from ``start_image``);
    ``frames`` past the trained 17 in ``parts`` = (frames, overlap) (long_video.py) or with ``context`` windows;
    ``options`` go to ``pipeline.generate`` (context, step_cache, cfg_skip, ...)."""
    prompts = model.text.encode(case.attributes.caption)
    run = generate
    if parts is not None:
        run = functools.partial(generate_in_parts, part_frames=parts[0], overlap=parts[1])
    return run(
        model.transformer,
        model.vae,
        prompts,
        make_sampler("Flow", "V5.1", steps),
        frames=frames,
        height=SIZE,
        width=SIZE,
        guidance=guidance,
        seed=case.seed,
        start_image=start_image(case) if image_to_video else None,
        **options,
    )


def evaluate(
    model: MicroModel,
    cases: list[Case],
    steps: int = 25,
    guidance: float = 6.0,
    image_to_video: bool = False,
    progress=None,
    keep_frames: bool = False,
    frames: int = FRAMES,
    parts: tuple[int, int] | None = None,
    cache_threshold: float | None = None,
    **options,
) -> tuple[dict, list[dict]]:
    """Generate and score every case: (rates from ``scoring.summarise``, one row per case).

    Clips longer than the trained 17 frames (``frames`` in ``parts`` or with ``context`` windows) also score whether
    the direction holds in each half of the clip on its own (``direction_kept``). ``cache_threshold``: step caching
    with the model folder's fitted polynomial (a new cache per video); the summary adds ``block_pass_share``."""
    rows, passes, calls = [], 0, 0
    coefficients = None if cache_threshold is None else model_coefficients(model.root, "V5.1", 0, 0)
    for i, case in enumerate(cases):
        cache = None
        if coefficients is not None:
            cache = options["step_cache"] = StepCache(coefficients, cache_threshold)
        video = generate_case(model, case, steps, guidance, image_to_video, frames, parts, **options)
        if cache is not None:
            passes, calls = passes + cache.passes, calls + cache.passes + cache.skips
        row = {**scoring.score(video, case.attributes), "seed": case.seed}
        if frames > FRAMES:
            halves = (video[: frames // 2 + 1], video[frames // 2 :])
            row["direction_kept"] = all(scoring.analyse(h).direction == case.attributes.direction for h in halves)
        if keep_frames:
            row["frames"] = video
        rows.append(row)
        if progress:
            progress(i + 1, len(cases))
    if calls:
        return {**scoring.summarise(rows), "block_pass_share": passes / calls}, rows
    return scoring.summarise(rows), rows
