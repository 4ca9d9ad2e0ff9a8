"""Video generation: V5 / V5.1 with the mag VAE, V4 with the slice VAE, V1-V3 (PixArt-motion) with their VAEs;
text-, image-, video- and control-to-video.

    generate(transformer, vae, prompts, sampler, frames=49, height=384, width=672, guidance=6.0, seed=0,
             start_image=None, end_image=None, video=None, control_video=None, ref_image=None,
             image_encoder=None)
        -> frames [F, H, W, 3] float in [0, 1]
    size_bucket(height, width, resolution) -> (height, width) of the official aspect-ratio buckets

Pixels in and out are float tensors in [0, 1]: images [H, W, 3], videos [F, H, W, 3] (ComfyUI's IMAGE
layout). Every random draw comes from one CPU ``torch.Generator`` seeded with ``seed``, in a fixed order
(initial noise, then the masked-video noise augmentation), so a seed reproduces bit for bit on CPU and
the same draws are made whatever the compute device.

Conditioning follows the official pipelines (spec §3.8, §4.5):
* InP models (33 input channels) take [mask (1) ; masked-video latents (16)]: the mask is 1 - m resized to
  the latent grid (frame 0 alone, then the rest), times the VAE scaling factor; the masked video is the
  input where kept and -1 where generated, with a little noise on the kept pixels, encoded to its mean.
  Without images both are zeros (text-to-video through an InP model).
* Control models take the control video's latents (zeros without one); V5.1 Control models append the
  reference image's latents at latent frame 0 (zeros elsewhere).
* V4 InP models (12 input channels, spec §1.7, §4.5 step 3) take [mask latents (4) ; masked-video latents (4)],
  BOTH through the slice VAE (the {0, 1} mask tiled to three channels is encoded like a video) and drawn from
  the posterior as the official V4 pipeline does; no noise augmentation. The start image also goes through the
  CLIP image encoder: for the last 40 % of the steps the conditional branch sees its features, every other
  call the learned padding. V4 also reads the text masks (padding positions get a learned table).
* V1-V3 (PixArt-motion, docs/v1_v3.md) read the T5 mask; their output carries a learned variance (dropped).
  V3 InP models (12 input channels) take [mask latents (4) ; masked-video latents (4)] made as V4's, and the
  start image's CLIP ``image_embeds`` (the original image, not resized to the video) for the last half of the
  steps (conditional branch; the unconditional one always sees them masked out).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .camera import CAMERA_CHANNELS, CAMERA_LATENT_SCALE, plucker_rays
from .context import ContextWindows, cut_in_time, predict_in_windows, reference_at_first_frame, riflex_frequency
from .parallel import ParallelGroups, SequenceParallel, gather_branches
from .sampling import Sampler
from .step_cache import StepCache
from .text_encoders import PromptEmbeds, PromptPair
from .transformer import EasyAnimateTransformer3D
from .transformer_v3 import CLIP_EMBED_DIM, CLIP_TOKENS, EasyAnimateV3Transformer3D
from .transformer_v4 import EasyAnimateV4Transformer3D
from .vae import MagvitVAE

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
StageFn = Callable[[str, torch.nn.Module], contextlib.AbstractContextManager]
# Per-step extra transformer inputs of the (unconditional, conditional) branches.
StepInputsFn = Callable[[int], tuple[dict, dict]]
Transformer = EasyAnimateTransformer3D | EasyAnimateV4Transformer3D | EasyAnimateV3Transformer3D
NOISE_AUG_STRENGTH = 0.0563  # σ of the noise added to kept pixels of InP inputs (official default)
# The share of the last steps whose conditional branch sees the start image's CLIP features (official defaults).
CLIP_APPLY_RATIO = {"V3": 0.5, "V4": 0.4}
CLIP_VERSIONS = tuple(CLIP_APPLY_RATIO)  # whose InP models also read the start image's CLIP features
V4_CLIP_APPLY_RATIO = CLIP_APPLY_RATIO["V4"]
PIXART_VERSIONS = ("V1", "V2", "V3")
# Versions whose pipelines draw encoded latents from the VAE posterior (V5 / V5.1 take its mean).
POSTERIOR_SAMPLING = ("V1", "V2", "V3", "V4")
# Base sides of the official size buckets (the 512 aspect-ratio table scaled); V4 was trained on 512 to 1280.
RESOLUTIONS = (512, 768, 960, 1024, 1280)


def _no_stage(name: str, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The default stage: models stay where they are."""
    return contextlib.nullcontext()


# The official 512-base aspect-ratio table (height / width -> [height, width]), easyanimate/data/bucket_sampler.py.
ASPECT_RATIO_512 = {
    "0.25": [256.0, 1024.0], "0.26": [256.0, 992.0], "0.27": [256.0, 960.0], "0.28": [256.0, 928.0],
    "0.32": [288.0, 896.0], "0.33": [288.0, 864.0], "0.35": [288.0, 832.0], "0.4": [320.0, 800.0],
    "0.42": [320.0, 768.0], "0.48": [352.0, 736.0], "0.5": [352.0, 704.0], "0.52": [352.0, 672.0],
    "0.57": [384.0, 672.0], "0.6": [384.0, 640.0], "0.68": [416.0, 608.0], "0.72": [416.0, 576.0],
    "0.78": [448.0, 576.0], "0.82": [448.0, 544.0], "0.88": [480.0, 544.0], "0.94": [480.0, 512.0],
    "1.0": [512.0, 512.0], "1.07": [512.0, 480.0], "1.13": [544.0, 480.0], "1.21": [544.0, 448.0],
    "1.29": [576.0, 448.0], "1.38": [576.0, 416.0], "1.46": [608.0, 416.0], "1.67": [640.0, 384.0],
    "1.75": [672.0, 384.0], "2.0": [704.0, 352.0], "2.09": [736.0, 352.0], "2.4": [768.0, 320.0],
    "2.5": [800.0, 320.0], "2.89": [832.0, 288.0], "3.0": [864.0, 288.0], "3.11": [896.0, 288.0],
    "3.62": [928.0, 256.0], "3.75": [960.0, 256.0], "3.88": [992.0, 256.0], "4.0": [1024.0, 256.0],
}  # fmt: skip


@dataclass(frozen=True)
class VideoSize:
    """Frames, height and width that the models accept (snapped from a request)."""

    frames: int
    height: int
    width: int


def model_version(transformer: Transformer) -> str:
    """ "V1" / "V2" / "V3" (PixArt-motion), "V4" (HunyuanDiT-based), "V5.1" (Qwen2-VL text, RMSNorm projection)
    or "V5" (BERT + mT5 text)."""
    if isinstance(transformer, EasyAnimateV3Transformer3D):
        return transformer.config.release
    if isinstance(transformer, EasyAnimateV4Transformer3D):
        return "V4"
    return "V5.1" if transformer.config.add_norm_text_encoder else "V5"


def model_inputs(transformer: Transformer, latent_channels: int) -> tuple[int, int]:
    """(inpaint channels, control channels) the transformer expects beyond the noisy latents."""
    version = model_version(transformer)
    if version == "V4" or version in PIXART_VERSIONS:
        if transformer.config.latent_channels != latent_channels:
            raise ValueError(
                f"this {version} transformer denoises {transformer.config.latent_channels}-channel latents but the "
                f"VAE makes {latent_channels}: use the {version} model's own VAE"
            )
        return transformer.config.inpaint_channels, 0
    extra = transformer.config.in_channels - latent_channels
    if extra == 0:
        return 0, 0
    if extra == 1 + latent_channels:
        return extra, 0
    if extra in (latent_channels, 2 * latent_channels, CAMERA_CHANNELS + latent_channels):
        return 0, extra
    raise ValueError(
        f"a transformer with {transformer.config.in_channels} input channels is not a T2V, InP, Control or "
        f"Control-Camera model for {latent_channels}-channel latents"
    )


def is_camera_model(control_channels: int, latent_channels: int) -> bool:
    """Whether a model's control input is [camera rays (6) ; reference (L)] (V5.1 Control-Camera)."""
    return control_channels == CAMERA_CHANNELS + latent_channels


def snap_size(frames: int, height: int, width: int, vae: MagvitVAE) -> VideoSize:
    """The nearest size the VAE and transformer accept, warning about every change."""
    multiple = vae.config.pixel_multiple
    new_h, new_w = max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)
    new_f, rule = vae.config.nearest_frames(frames)
    changes = []
    if (new_h, new_w) != (height, width):
        changes.append(f"size {width}x{height} -> {new_w}x{new_h} (multiples of {multiple})")
    if new_f != frames:
        changes.append(f"frames {frames} -> {new_f} (must be {rule})")
    if changes:
        logger.warning("adjusted the request: %s", "; ".join(changes))
    return VideoSize(new_f, new_h, new_w)


def size_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) of the official bucket closest in aspect ratio, at ``resolution`` (512 ... 1280).

    The official tools pick the 512-base aspect-ratio table's entry nearest to height / width, scale it by
    resolution / 512 and round each side down to a multiple of 16.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}, got {resolution}")
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot pick a size bucket for {width}x{height}")
    ratio = min(ASPECT_RATIO_512, key=lambda r: abs(float(r) - height / width))
    bucket_h, bucket_w = (int(x * resolution / 512 / 16) * 16 for x in ASPECT_RATIO_512[ratio])
    return bucket_h, bucket_w


def to_model_pixels(frames: torch.Tensor, size: VideoSize) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] -> [1, 3, F, h, w] in [-1, 1] at the target size (bilinear resize if needed)."""
    x = frames.float().permute(0, 3, 1, 2)  # [F, 3, H, W]
    if x.shape[-2:] != (size.height, size.width):
        x = F.interpolate(x, size=(size.height, size.width), mode="bilinear", align_corners=False, antialias=True)
    return (x * 2 - 1).clamp(-1, 1).transpose(0, 1).unsqueeze(0)


def resized_image(image: torch.Tensor, size: VideoSize) -> torch.Tensor:
    """An image [H, W, 3] in [0, 1] at the video's size (what the official pipelines hand to CLIP)."""
    return (to_model_pixels(image[None], size)[0, :, 0].permute(1, 2, 0) + 1) / 2


def resize_mask(mask: torch.Tensor, latent_shape: tuple[int, ...], first_frame_alone: bool) -> torch.Tensor:
    """Mask [B, 1, F, H, W] -> latent grid [B, 1, T, h, w], trilinear; frame 0 to latent frame 0 on its own."""
    t, h, w = latent_shape[-3:]
    if not first_frame_alone or t == 1:
        return F.interpolate(mask[:, :, : (1 if t == 1 else None)], size=(t, h, w), mode="trilinear")
    first = F.interpolate(mask[:, :, :1], size=(1, h, w), mode="trilinear")
    rest = F.interpolate(mask[:, :, 1:], size=(t - 1, h, w), mode="trilinear")
    return torch.cat([first, rest], dim=2)


def image_to_video_inputs(
    start_image: torch.Tensor | None, end_image: torch.Tensor | None, size: VideoSize
) -> tuple[torch.Tensor, torch.Tensor]:
    """Video [1, 3, F, H, W] in [-1, 1] and mask [1, 1, F, H, W] (1 = generate) for start/end images.

    ``start_image`` [H, W, 3], or first frames [K, H, W, 3] to keep (a continued clip, as the official long-video
    generation passes the previous part's last frames)."""
    video = torch.zeros(1, 3, size.frames, size.height, size.width)
    mask = torch.ones(1, 1, size.frames, size.height, size.width)
    if start_image is not None:
        first = start_image if start_image.ndim == 4 else start_image[None]
        video[:] = to_model_pixels(first[:1], size)  # the (first) start image tiled over all frames
        video[:, :, : len(first)] = to_model_pixels(first, size)
        mask[:, :, : len(first)] = 0
    if end_image is not None:
        video[:, :, -1:] = to_model_pixels(end_image[None], size)
        mask[:, :, -1] = 0
    return video, mask


def encode_mean(vae: MagvitVAE, pixels: torch.Tensor, device) -> torch.Tensor:
    """DiT-space latents of pixels in [-1, 1]: the posterior mean times the scaling factor."""
    mean, _ = vae.encode(pixels.to(device))
    return mean * vae.config.scaling_factor


def encode_sample(vae: MagvitVAE, pixels: torch.Tensor, device, generator: torch.Generator) -> torch.Tensor:
    """DiT-space latents drawn from the posterior (mean + std * noise), times the scaling factor (V4 pipelines)."""
    mean, logvar = vae.encode(pixels.to(device))
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + torch.exp(0.5 * logvar) * noise) * vae.config.scaling_factor


def masked_video(
    video: torch.Tensor | None, mask: torch.Tensor | None, generator: torch.Generator, noise_aug_strength: float
) -> torch.Tensor | None:
    """The clip an InP model sees: generated pixels at -1, kept pixels noise-augmented; None when nothing is kept."""
    if video is None or bool((mask > 0.5).all()):
        return None
    keep = mask < 0.5
    masked = torch.where(keep, video, torch.full_like(video, -1.0))
    if noise_aug_strength > 0:
        noise = torch.randn(masked.shape, generator=generator) * noise_aug_strength
        masked = masked + torch.where(masked == -1, torch.zeros_like(noise), noise)
    return masked


def inpaint_from_masked(vae: MagvitVAE, masked_latents: torch.Tensor, mask: torch.Tensor, device) -> torch.Tensor:
    """[mask (1) ; masked-video latents (L)] from the DiT-space latents of ``masked_video``."""
    first_alone = vae.config.temporal_mode == "mag"
    mask_latents = resize_mask(1 - mask, masked_latents.shape, first_alone) * vae.config.scaling_factor
    return torch.cat([mask_latents.to(device), masked_latents.to(device)], dim=1)


def inpaint_latents(
    vae: MagvitVAE,
    video: torch.Tensor | None,
    mask: torch.Tensor | None,
    latent_shape: tuple[int, ...],
    generator: torch.Generator,
    noise_aug_strength: float,
    device,
) -> torch.Tensor:
    """[mask (1) ; masked-video latents (L)] for an InP model; zeros when nothing is kept."""
    b, channels = latent_shape[0], latent_shape[1]
    masked = masked_video(video, mask, generator, noise_aug_strength)
    if masked is None:
        return torch.zeros(b, 1 + channels, *latent_shape[2:], device=device)
    return inpaint_from_masked(vae, encode_mean(vae, masked, device), mask, device)


def encoded_mask_inpaint_latents(
    vae: MagvitVAE,
    video: torch.Tensor | None,
    mask: torch.Tensor | None,
    latent_shape: tuple[int, ...],
    generator: torch.Generator,
    device,
) -> torch.Tensor:
    """[mask latents (L) ; masked-video latents (L)] for a V4 or V3 InP model, both encoded by the VAE (posterior
    samples); zeros without a video. The mask (1 = generate) is tiled to three channels and encoded as it is, in
    {0, 1}; an all-ones mask is encoded too (V3's official text-to-video passes one)."""
    b, channels = latent_shape[0], latent_shape[1]
    if video is None:
        return torch.zeros(b, 2 * channels, *latent_shape[2:], device=device)
    masked = torch.where(mask < 0.5, video, torch.full_like(video, -1.0))
    mask_latents = encode_sample(vae, mask.expand_as(video), device, generator)
    masked_latents = encode_sample(vae, masked, device, generator)
    return torch.cat([mask_latents, masked_latents], dim=1)


def clip_active(i: int, num_steps: int, ratio: float = V4_CLIP_APPLY_RATIO) -> bool:
    """Whether step ``i`` of ``num_steps`` is in the last ``ratio`` of the steps, where V4 / V3 read CLIP features."""
    return i >= num_steps * (1 - ratio)


def clip_step_inputs(
    features: torch.Tensor | None, n_query: int, num_steps: int, ratio: float, absent: torch.Tensor | None = None
) -> StepInputsFn:
    """Per-step CLIP inputs of the V4 / V3 pipelines: the image features for the conditional branch during the last
    ``ratio`` of the steps (the unconditional one gets zeros, masked out). Elsewhere, ``absent`` None gives no
    inputs (V4 then reads its learned image padding); V3 passes the zero features its official pipeline feeds there,
    masked out (with the additive -10000 mask bias that is not always exactly nothing)."""

    def masked(x: torch.Tensor) -> dict:
        return {"clip_encoder_hidden_states": x, "clip_attention_mask": x.new_zeros(x.shape[0], n_query)}

    def inputs(i: int) -> tuple[dict, dict]:
        if features is None or not clip_active(i, num_steps, ratio):
            return ({}, {}) if absent is None else (masked(absent), masked(absent))
        ones = torch.ones(features.shape[0], n_query, device=features.device, dtype=features.dtype)
        return masked(torch.zeros_like(features)), {"clip_encoder_hidden_states": features, "clip_attention_mask": ones}

    return inputs


def control_latents(
    vae: MagvitVAE,
    control_video: torch.Tensor | None,
    ref_image: torch.Tensor | None,
    latent_shape: tuple[int, ...],
    channels: int,
    size: VideoSize,
    device,
    camera: np.ndarray | None = None,
) -> torch.Tensor:
    """[control latents (L) ; reference latents at frame 0 (L, V5.1 only)] for a Control model; for a
    Control-Camera model [camera rays (6) ; reference (L)]: the Plücker rays of the pose rows ``camera``
    (camera.py) resized to the latent grid like the inpaint mask, times CAMERA_LATENT_SCALE (zeros without)."""
    b, lat = latent_shape[0], latent_shape[1]
    zeros = torch.zeros(b, lat, *latent_shape[2:], device=device)
    if is_camera_model(channels, lat):
        control = torch.zeros(b, CAMERA_CHANNELS, *latent_shape[2:], device=device)
        if camera is not None:
            rays = plucker_rays(camera[: size.frames], size.width, size.height)  # [F, H, W, 6]
            rays = resize_mask(rays.permute(3, 0, 1, 2)[None], latent_shape, first_frame_alone=True)
            control = (rays * CAMERA_LATENT_SCALE).expand(b, -1, -1, -1, -1).to(device)
    else:
        control = zeros if control_video is None else encode_mean(vae, to_model_pixels(control_video, size), device)
    if channels == lat:
        if ref_image is not None:
            raise ValueError("this Control model (V5) takes no reference image; pass ref_image=None")
        return control
    ref = zeros.clone()
    if ref_image is not None and latent_shape[2] != 1:
        # As the official pipeline: a single-latent (one-frame) generation ignores the reference.
        ref[:, :, :1] = encode_mean(vae, to_model_pixels(ref_image[None], size), device)
    return torch.cat([control, ref], dim=1)


def text_inputs(embeds: PromptEmbeds, device, dtype, version: str = "V5.1") -> dict:
    """Transformer keyword arguments for the text streams of a model ``version``, with the token masks where the
    model reads them (V4 and V1-V3 do, V5 / V5.1 never)."""
    kw = {"encoder_hidden_states": embeds.embeds.to(device, dtype)}
    if embeds.embeds_2 is not None:
        kw["encoder_hidden_states_t5"] = embeds.embeds_2.to(device, dtype)
    if version == "V4":
        kw["text_embedding_mask"] = embeds.mask.to(device)
        if embeds.mask_2 is not None:
            kw["text_embedding_mask_t5"] = embeds.mask_2.to(device)
    elif version in PIXART_VERSIONS:
        kw["encoder_attention_mask"] = embeds.mask.to(device)
    return kw


def check_parallel(
    transformer: Transformer,
    vae: MagvitVAE,
    parallel: ParallelGroups,
    size: VideoSize,
    guidance: float,
    context: ContextWindows | None = None,
) -> None:
    """Raise before any work when ``parallel``'s degrees cannot run this model on this video."""
    layout = parallel.layout
    if layout.cfg == 2 and guidance <= 1.0:
        raise ValueError(f"CFG-parallel runs the two guidance branches side by side; guidance {guidance} has one")
    if layout.sequence == 1:
        return
    version = model_version(transformer)
    if version == "V4" or version in PIXART_VERSIONS:
        raise ValueError(
            f"sequence parallelism (Ulysses / ring degrees) runs V5 / V5.1 models; {version} takes CFG-parallel"
        )
    frames = vae.latent_frames(size.frames) if context is None else min(context.length, vae.latent_frames(size.frames))
    grid = transformer.config.patch_size * vae.config.spatial_compression
    tokens = frames * (size.height // grid) * (size.width // grid)
    where = "" if context is None else " of a context window"
    layout.check_model(transformer.config.num_attention_heads, tokens, where)


def cfg_skip_steps(steps: int, share: float, at: str = "end") -> set[int]:
    """The steps that skip the unconditional branch: the first or last ``share`` of ``steps`` (rounded down)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the CFG-skip share must be at least 0 and below 1 (e.g. 0.25), got {share}")
    if at not in ("start", "end"):
        raise ValueError(f'CFG skipping is at the "start" or the "end" of the steps, not {at!r}')
    count = int(steps * share)
    return set(range(count)) if at == "start" else set(range(steps - count, steps))


def denoise(
    transformer: Transformer,
    latents: torch.Tensor,
    sampler: Sampler,
    prompts: PromptPair,
    guidance: float,
    extra: dict[str, torch.Tensor],
    generator: torch.Generator,
    cfg_batched: bool = True,
    progress: ProgressFn | None = None,
    step_inputs: StepInputsFn | None = None,
    context: ContextWindows | None = None,
    rope_temporal_frequency: tuple[int, float] | None = None,
    step_cache: StepCache | None = None,
    cfg_skip: float = 0.0,
    cfg_skip_at: str = "end",
    parallel: ParallelGroups | None = None,
) -> torch.Tensor:
    """The sampling loop with classifier-free guidance (uncond and cond in one batch, or one after the other).

    ``extra`` inputs (latents with a time axis) are the same for both branches; ``step_inputs(i)`` gives per-step
    (uncond, cond) inputs. ``context``: every prediction is made in these windows of latent frames and blended
    (``context.predict_in_windows``). ``rope_temporal_frequency``: RIFLEx (V5 / V5.1). ``step_cache``: TeaCache
    (step_cache.py), its state per branch and window. ``cfg_skip``: the share of the steps at the ``cfg_skip_at``
    ("end" or "start") of the schedule that run the conditional branch alone (guidance off: half the work).
    ``parallel`` (this process's ``parallel.ParallelGroups``): the video tokens are sharded over its sequence group,
    and with a CFG degree of 2 each branch runs on its own ranks; every rank returns the same latents.
    """
    device, dtype = latents.device, latents.dtype
    sequence = {}
    if parallel is not None and parallel.layout.sequence > 1:
        sequence = {"sequence_parallel": SequenceParallel(parallel)}
    cfg_parallel = parallel is not None and parallel.layout.cfg == 2
    use_cfg = guidance > 1.0
    version = model_version(transformer)
    cond = text_inputs(prompts.positive, device, dtype, version)
    uncond = text_inputs(prompts.negative, device, dtype, version) if use_cfg else None
    latent_channels = latents.shape[1]

    rope = {} if rope_temporal_frequency is None else {"rope_temporal_frequency": rope_temporal_frequency}

    def window_inputs(name: str, value: torch.Tensor, span: range) -> torch.Tensor:
        # V5.1 Control and Control-Camera models: the last latent_channels are the reference slot.
        if name == "control_latents" and value.shape[1] in (2 * latent_channels, CAMERA_CHANNELS + latent_channels):
            control, reference = value[:, :-latent_channels], value[:, -latent_channels:]
            return torch.cat([cut_in_time(name, control, span), reference_at_first_frame(reference, len(span))], 1)
        return cut_in_time(name, value, span)

    steps = sampler.num_steps
    skip_steps = cfg_skip_steps(steps, cfg_skip, cfg_skip_at)

    def predict(x: torch.Tensor, t: torch.Tensor, inputs: dict, n: int, branch: str, i: int) -> torch.Tensor:
        def window(x: torch.Tensor, window_extra: dict, span: range) -> torch.Tensor:
            repeated = {k: v.repeat(n, 1, 1, 1, 1) for k, v in window_extra.items()}
            cache = {} if step_cache is None else {"step_cache": step_cache.for_call((branch, span), i, steps)}
            out = transformer(x, t.expand(x.shape[0]), **inputs, **repeated, **rope, **cache, **sequence)
            return out[:, :latent_channels]  # a learned-sigma output carries extra channels

        if context is None:
            return window(x, extra, range(x.shape[2]))
        return predict_in_windows(window, x, extra, context, cut=window_inputs)

    for i in range(steps):
        t = sampler.timesteps[i : i + 1].to(device=device, dtype=dtype)
        x = sampler.scale_model_input(latents, i)
        step_uncond, step_cond = step_inputs(i) if step_inputs else ({}, {})
        if not use_cfg or i in skip_steps:
            pred = predict(x, t, {**cond, **step_cond}, 1, "cond", i)
        elif cfg_parallel:  # this rank's branch; the other rank of its CFG group runs the other one
            name, inputs = (("uncond", {**uncond, **step_uncond}), ("cond", {**cond, **step_cond}))[parallel.cfg_index]
            pred_uncond, pred_cond = gather_branches(parallel, predict(x, t, inputs, 1, name, i)).chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        elif cfg_batched:
            branch_uncond, branch_cond = {**uncond, **step_uncond}, {**cond, **step_cond}
            both = {k: torch.cat([branch_uncond[k], branch_cond[k]]) for k in branch_cond}
            pred_uncond, pred_cond = predict(torch.cat([x, x]), t, both, 2, "both", i).chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        else:
            pred_uncond = predict(x, t, {**uncond, **step_uncond}, 1, "uncond", i)
            pred_cond = predict(x, t, {**cond, **step_cond}, 1, "cond", i)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = sampler.step(pred, i, latents, generator=generator)
        if progress:
            progress(i + 1, sampler.num_steps)
    return latents


@torch.no_grad()
def generate(
    transformer: Transformer,
    vae: MagvitVAE,
    prompts: PromptPair,
    sampler: Sampler,
    *,
    frames: int = 49,
    height: int = 384,
    width: int = 672,
    guidance: float = 6.0,
    seed: int = 0,
    start_image: torch.Tensor | None = None,
    end_image: torch.Tensor | None = None,
    video: torch.Tensor | None = None,
    control_video: torch.Tensor | None = None,
    ref_image: torch.Tensor | None = None,
    camera: np.ndarray | None = None,
    image_encoder=None,
    clip_apply_ratio: float | None = None,
    noise_aug_strength: float = NOISE_AUG_STRENGTH,
    cfg_batched: bool = True,
    latents: torch.Tensor | None = None,
    decode_chunk: int | None = None,
    decode: bool = True,
    progress: ProgressFn | None = None,
    device: torch.device | str | None = None,
    stage: StageFn | None = None,
    context: ContextWindows | None = None,
    riflex_trained_frames: int | None = None,
    step_cache: StepCache | None = None,
    cfg_skip: float = 0.0,
    cfg_skip_at: str = "end",
    parallel: ParallelGroups | None = None,
) -> torch.Tensor:
    """Generate one video: frames [F, H, W, 3] in [0, 1] on the CPU, or (``decode=False``) the final
    DiT-space latents [1, C, T, h, w] (see the module docstring).

    ``image_encoder`` (V4 / V3 InP image-to-video): the CLIP encoder of the start image (``load_image_encoder``);
    ``clip_apply_ratio``: the share of final steps its features condition (default: the version's official
    value, ``CLIP_APPLY_RATIO``). ``noise_aug_strength``: V5 / V5.1 only.
    ``device``: where to compute (default: where the transformer's weights are; give it when they are
    streamed from the CPU). ``stage(name, model)``: a context manager around each use of a model
    ("image_encoder", "vae" encode, "transformer" sampling, "vae" decode), e.g. ``offload.ModelPlacement.using``.
    ``context``: sample in overlapping windows of latent frames (``easyanimate_core.context``), for clips longer than
    the model was trained on. ``riflex_trained_frames`` (V5 / V5.1): the video frames the model was trained on; a
    longer clip gets RIFLEx's temporal RoPE change (``context.riflex_frequency``), for one pass a little longer.
    ``step_cache`` (TeaCache, step_cache.py), ``cfg_skip`` / ``cfg_skip_at``: faster sampling (``denoise``).
    ``parallel``: this process's place among several generating the same video (``denoise``); every rank calls this.
    """
    inpaint_ch, control_ch = model_inputs(transformer, vae.config.latent_channels)
    version = model_version(transformer)
    is_v4, pixart = version == "V4", version in PIXART_VERSIONS
    camera_model = is_camera_model(control_ch, vae.config.latent_channels)
    if camera is not None and not camera_model:
        raise ValueError("camera poses need a V5.1 Control-Camera model; this transformer is not one")
    if camera_model and control_video is not None:
        raise ValueError("a Control-Camera model takes camera poses (camera=...), not a control video")
    if camera is not None and len(camera) < frames:
        raise ValueError(f"the camera has {len(camera)} poses; {frames} frames need at least {frames}")
    if control_ch and (start_image is not None or end_image is not None):
        raise ValueError("a Control model takes no start/end image; use ref_image for a V5.1 Control model")
    if (control_video is not None or ref_image is not None) and not control_ch:
        raise ValueError("control_video / ref_image need a Control model; this transformer is not one")
    if (start_image is not None or end_image is not None) and not inpaint_ch:
        raise ValueError("start/end images need an InP model; this transformer is text-to-video only")
    if start_image is not None and start_image.ndim == 4 and (is_v4 or pixart or len(start_image) >= frames):
        raise ValueError("several start frames need a V5 / V5.1 InP model and fewer frames than the clip")
    clip_needed = (is_v4 or pixart) and start_image is not None and transformer.config.has_clip
    if clip_needed and image_encoder is None:
        raise ValueError(
            f"{version} image-to-video also conditions on the start image's CLIP features: pass "
            "image_encoder=load_image_encoder(<model folder>) (the model's image_encoder/ folder)"
        )
    if pixart and (step_cache is not None or riflex_trained_frames is not None):
        raise ValueError(
            f"the step cache and RIFLEx serve V4-V5.1 models; {version} supports neither: drop them for this model"
        )
    if video is not None and sampler.start == 0:
        raise ValueError("video-to-video needs a sampler made with strength < 1 (the share of steps to run)")
    if video is not None and video.shape[0] < frames:
        raise ValueError(f"the input video has {video.shape[0]} frames; {frames} were requested")
    cfg_skip_steps(sampler.num_steps, cfg_skip, cfg_skip_at)  # a bad share fails before any encode
    if riflex_trained_frames is not None and (is_v4 or pixart):
        raise ValueError("RIFLEx changes the temporal RoPE of V5 / V5.1; V4 has none (its RoPE is 2-D): drop it")
    size = snap_size(frames, height, width, vae)
    if parallel is not None:
        check_parallel(transformer, vae, parallel, size, guidance, context)
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    dtype = transformer.dtype
    stage = stage or _no_stage
    generator = torch.Generator("cpu").manual_seed(seed)

    shape = (
        1,
        vae.config.latent_channels,
        vae.latent_frames(size.frames),
        size.height // vae.config.spatial_compression,
        size.width // vae.config.spatial_compression,
    )
    noise = torch.randn(shape, generator=generator) if latents is None else latents.float().cpu()
    x0 = None
    extra = {}
    step_inputs = None
    if pixart and transformer.config.has_clip and not clip_needed:  # V3 InP, text-to-video: masked zero features
        absent = torch.zeros(1, CLIP_EMBED_DIM, device=device, dtype=dtype)
        step_inputs = clip_step_inputs(None, CLIP_TOKENS, sampler.num_steps, 0.0, absent)
    if clip_needed:
        # V3's official pipeline hands CLIP the start image as given; V4's, the image resized to the video.
        clip_image = start_image if pixart else resized_image(start_image, size)
        with stage("image_encoder", image_encoder):
            features = image_encoder.encode(clip_image).to(device, dtype)
        tokens = CLIP_TOKENS if pixart else transformer.config.n_query
        ratio = CLIP_APPLY_RATIO[version] if clip_apply_ratio is None else clip_apply_ratio
        absent = torch.zeros_like(features) if pixart else None
        step_inputs = clip_step_inputs(features, tokens, sampler.num_steps, ratio, absent)
    encodes = any(t is not None for t in (video, start_image, end_image, control_video, ref_image))
    with stage("vae", vae) if encodes else contextlib.nullcontext():
        if video is not None:
            pixels = to_model_pixels(video[: size.frames], size)
            # The V1-V4 pipelines sample the posterior; V5 / V5.1 take its mean.
            sampled = version in POSTERIOR_SAMPLING
            x0 = (encode_sample(vae, pixels, device, generator) if sampled else encode_mean(vae, pixels, device)).cpu()
        if inpaint_ch:
            # Nothing kept (text- or video-to-video through an InP model) gives all-zero inpaint latents.
            # V3's official text-to-video encodes an all-generate mask and video; V4-V5.1 give zeros for nothing kept.
            nothing_kept = start_image is None and end_image is None and not pixart
            pixels, mask = (None, None) if nothing_kept else image_to_video_inputs(start_image, end_image, size)
            if is_v4 or pixart:
                inpaint = encoded_mask_inpaint_latents(vae, pixels, mask, shape, generator, device)
            else:
                inpaint = inpaint_latents(vae, pixels, mask, shape, generator, noise_aug_strength, device)
            extra["inpaint_latents"] = inpaint.to(dtype)
        if control_ch:
            extra["control_latents"] = control_latents(
                vae, control_video, ref_image, shape, control_ch, size, device, camera
            ).to(dtype)
    latents = sampler.initial_latents(noise, x0).to(device, dtype)
    rope_frequency = None
    seen = shape[2] if context is None else min(shape[2], context.length)  # latent frames of one model call
    if riflex_trained_frames is not None and seen > vae.latent_frames(riflex_trained_frames):
        head_dim = transformer.config.attention_head_dim
        rope_frequency = riflex_frequency(head_dim, vae.latent_frames(riflex_trained_frames), seen)

    with stage("transformer", transformer):
        latents = denoise(
            transformer,
            latents,
            sampler,
            prompts,
            guidance,
            extra,
            generator,
            cfg_batched,
            progress,
            step_inputs,
            context=context,
            rope_temporal_frequency=rope_frequency,
            step_cache=step_cache,
            cfg_skip=cfg_skip,
            cfg_skip_at=cfg_skip_at,
            parallel=parallel,
        )
    if not decode:
        return latents
    with stage("vae", vae):
        pixels = vae.decode(latents.float() / vae.config.scaling_factor, chunk_latents=decode_chunk)
    # In place: the decoded video is ours, and a long clip should not be copied twice more.
    return pixels[0].cpu().clamp_(-1, 1).add_(1).div_(2).permute(1, 2, 3, 0)  # [F, H, W, 3]
