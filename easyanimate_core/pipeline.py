"""Video generation with the V5 / V5.1 transformer and the mag VAE: text-, image-, video- and control-to-video.

    generate(transformer, vae, prompts, sampler, frames=49, height=384, width=672, guidance=6.0, seed=0,
             start_image=None, end_image=None, video=None, control_video=None, ref_image=None)
        -> frames [F, H, W, 3] float in [0, 1]

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
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sampling import Sampler
from .text_encoders import PromptEmbeds, PromptPair
from .transformer import EasyAnimateTransformer3D
from .vae import MagvitVAE

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
StageFn = Callable[[str, torch.nn.Module], contextlib.AbstractContextManager]
NOISE_AUG_STRENGTH = 0.0563  # σ of the noise added to kept pixels of InP inputs (official default)


def _no_stage(name: str, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The default stage: models stay where they are."""
    return contextlib.nullcontext()


@dataclass(frozen=True)
class VideoSize:
    """Frames, height and width that the models accept (snapped from a request)."""

    frames: int
    height: int
    width: int


def model_version(transformer: EasyAnimateTransformer3D) -> str:
    """ "V5.1" (Qwen2-VL text, RMSNorm projection) or "V5" (BERT + mT5 text)."""
    return "V5.1" if transformer.config.add_norm_text_encoder else "V5"


def model_inputs(transformer: EasyAnimateTransformer3D, latent_channels: int) -> tuple[int, int]:
    """(inpaint channels, control channels) the transformer expects beyond the noisy latents."""
    extra = transformer.config.in_channels - latent_channels
    if extra == 0:
        return 0, 0
    if extra == 1 + latent_channels:
        return extra, 0
    if extra in (latent_channels, 2 * latent_channels):
        return 0, extra
    raise ValueError(
        f"a transformer with {transformer.config.in_channels} input channels is not a T2V, InP or Control model "
        f"for {latent_channels}-channel latents (camera control is not supported yet)"
    )


def snap_size(frames: int, height: int, width: int, vae: MagvitVAE) -> VideoSize:
    """The nearest size the VAE and transformer accept, warning about every change."""
    multiple = vae.config.pixel_multiple
    new_h, new_w = max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)
    step = vae.config.temporal_compression
    if vae.config.temporal_mode == "mag":
        new_f = max(1, (frames - 1) // step * step + 1)
        rule = f"{step}k+1"
    else:
        new_f = 1 if frames == 1 else max(2 * step, frames // (2 * step) * 2 * step)
        rule = f"a multiple of {2 * step} (or 1)"
    changes = []
    if (new_h, new_w) != (height, width):
        changes.append(f"size {width}x{height} -> {new_w}x{new_h} (multiples of {multiple})")
    if new_f != frames:
        changes.append(f"frames {frames} -> {new_f} (must be {rule})")
    if changes:
        logger.warning("adjusted the request: %s", "; ".join(changes))
    return VideoSize(new_f, new_h, new_w)


def to_model_pixels(frames: torch.Tensor, size: VideoSize) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] -> [1, 3, F, h, w] in [-1, 1] at the target size (bilinear resize if needed)."""
    x = frames.float().permute(0, 3, 1, 2)  # [F, 3, H, W]
    if x.shape[-2:] != (size.height, size.width):
        x = F.interpolate(x, size=(size.height, size.width), mode="bilinear", align_corners=False, antialias=True)
    return (x * 2 - 1).clamp(-1, 1).transpose(0, 1).unsqueeze(0)


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
    """Video [1, 3, F, H, W] in [-1, 1] and mask [1, 1, F, H, W] (1 = generate) for start/end images."""
    video = torch.zeros(1, 3, size.frames, size.height, size.width)
    mask = torch.ones(1, 1, size.frames, size.height, size.width)
    if start_image is not None:
        video[:] = to_model_pixels(start_image[None], size)  # the start image tiled over all frames
        mask[:, :, 0] = 0
    if end_image is not None:
        video[:, :, -1:] = to_model_pixels(end_image[None], size)
        mask[:, :, -1] = 0
    return video, mask


def encode_mean(vae: MagvitVAE, pixels: torch.Tensor, device) -> torch.Tensor:
    """DiT-space latents of pixels in [-1, 1]: the posterior mean times the scaling factor."""
    mean, _ = vae.encode(pixels.to(device))
    return mean * vae.config.scaling_factor


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
    if video is None or bool((mask > 0.5).all()):
        return torch.zeros(b, 1 + channels, *latent_shape[2:], device=device)
    keep = mask < 0.5
    masked = torch.where(keep, video, torch.full_like(video, -1.0))
    if noise_aug_strength > 0:
        noise = torch.randn(masked.shape, generator=generator) * noise_aug_strength
        masked = masked + torch.where(masked == -1, torch.zeros_like(noise), noise)
    masked_latents = encode_mean(vae, masked, device)
    first_alone = vae.config.temporal_mode == "mag"
    mask_latents = resize_mask(1 - mask, masked_latents.shape, first_alone) * vae.config.scaling_factor
    return torch.cat([mask_latents.to(device), masked_latents], dim=1)


def control_latents(
    vae: MagvitVAE,
    control_video: torch.Tensor | None,
    ref_image: torch.Tensor | None,
    latent_shape: tuple[int, ...],
    channels: int,
    size: VideoSize,
    device,
) -> torch.Tensor:
    """[control latents (L) ; reference latents at frame 0 (L, V5.1 only)] for a Control model."""
    b, lat = latent_shape[0], latent_shape[1]
    zeros = torch.zeros(b, lat, *latent_shape[2:], device=device)
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


def text_inputs(embeds: PromptEmbeds, device, dtype) -> dict:
    """Transformer keyword arguments for the text streams (the transformer never sees the masks)."""
    kw = {"encoder_hidden_states": embeds.embeds.to(device, dtype)}
    if embeds.embeds_2 is not None:
        kw["encoder_hidden_states_t5"] = embeds.embeds_2.to(device, dtype)
    return kw


def denoise(
    transformer: EasyAnimateTransformer3D,
    latents: torch.Tensor,
    sampler: Sampler,
    prompts: PromptPair,
    guidance: float,
    extra: dict[str, torch.Tensor],
    generator: torch.Generator,
    cfg_batched: bool = True,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """The sampling loop with classifier-free guidance (uncond and cond in one batch, or one after the other)."""
    device, dtype = latents.device, latents.dtype
    use_cfg = guidance > 1.0
    cond = text_inputs(prompts.positive, device, dtype)
    uncond = text_inputs(prompts.negative, device, dtype) if use_cfg else None
    latent_channels = latents.shape[1]

    def predict(x: torch.Tensor, t: torch.Tensor, text: dict, n: int) -> torch.Tensor:
        out = transformer(x, t.expand(x.shape[0]), **text, **{k: v.repeat(n, 1, 1, 1, 1) for k, v in extra.items()})
        return out[:, :latent_channels]  # a learned-sigma output carries extra channels

    for i in range(sampler.num_steps):
        t = sampler.timesteps[i : i + 1].to(device=device, dtype=dtype)
        x = sampler.scale_model_input(latents, i)
        if not use_cfg:
            pred = predict(x, t, cond, 1)
        elif cfg_batched:
            both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            pred_uncond, pred_cond = predict(torch.cat([x, x]), t, both, 2).chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        else:
            pred_uncond = predict(x, t, uncond, 1)
            pred_cond = predict(x, t, cond, 1)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = sampler.step(pred, i, latents, generator=generator)
        if progress:
            progress(i + 1, sampler.num_steps)
    return latents


@torch.no_grad()
def generate(
    transformer: EasyAnimateTransformer3D,
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
    noise_aug_strength: float = NOISE_AUG_STRENGTH,
    cfg_batched: bool = True,
    latents: torch.Tensor | None = None,
    decode_chunk: int | None = None,
    decode: bool = True,
    progress: ProgressFn | None = None,
    device: torch.device | str | None = None,
    stage: StageFn | None = None,
) -> torch.Tensor:
    """Generate one video: frames [F, H, W, 3] in [0, 1] on the CPU, or (``decode=False``) the final
    DiT-space latents [1, C, T, h, w] (see the module docstring).

    ``device``: where to compute (default: where the transformer's weights are; give it when they are
    streamed from the CPU). ``stage(name, model)``: a context manager around each use of a model
    ("vae" encode, "transformer" sampling, "vae" decode), e.g. ``offload.ModelPlacement.using``.
    """
    inpaint_ch, control_ch = model_inputs(transformer, vae.config.latent_channels)
    if control_ch and (start_image is not None or end_image is not None):
        raise ValueError("a Control model takes no start/end image; use ref_image for a V5.1 Control model")
    if (control_video is not None or ref_image is not None) and not control_ch:
        raise ValueError("control_video / ref_image need a Control model; this transformer is not one")
    if video is not None and sampler.start == 0:
        raise ValueError("video-to-video needs a sampler made with strength < 1 (the share of steps to run)")
    if video is not None and video.shape[0] < frames:
        raise ValueError(f"the input video has {video.shape[0]} frames; {frames} were requested")
    size = snap_size(frames, height, width, vae)
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    dtype = transformer.dtype
    stage = stage or _no_stage
    generator = torch.Generator("cpu").manual_seed(seed)

    shape = (
        1,
        vae.config.latent_channels,
        (size.frames - 1) // vae.config.temporal_compression + 1,
        size.height // vae.config.spatial_compression,
        size.width // vae.config.spatial_compression,
    )
    noise = torch.randn(shape, generator=generator) if latents is None else latents.float().cpu()
    x0 = None
    extra = {}
    encodes = any(t is not None for t in (video, start_image, end_image, control_video, ref_image))
    with stage("vae", vae) if encodes else contextlib.nullcontext():
        if video is not None:
            x0 = encode_mean(vae, to_model_pixels(video[: size.frames], size), device).cpu()
        if inpaint_ch:
            # Nothing kept (text- or video-to-video through an InP model) gives all-zero inpaint latents.
            pixels, mask = (
                (None, None)
                if start_image is None and end_image is None
                else (image_to_video_inputs(start_image, end_image, size))
            )
            extra["inpaint_latents"] = inpaint_latents(
                vae, pixels, mask, shape, generator, noise_aug_strength, device
            ).to(dtype)
        if control_ch:
            extra["control_latents"] = control_latents(
                vae, control_video, ref_image, shape, control_ch, size, device
            ).to(dtype)
    latents = sampler.initial_latents(noise, x0).to(device, dtype)

    with stage("transformer", transformer):
        latents = denoise(transformer, latents, sampler, prompts, guidance, extra, generator, cfg_batched, progress)
    if not decode:
        return latents
    with stage("vae", vae):
        pixels = vae.decode(latents.float() / vae.config.scaling_factor, chunk_latents=decode_chunk)
    return ((pixels[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu()  # [F, H, W, 3]
