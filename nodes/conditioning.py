"""Conditioning nodes: image-to-video, video-to-video and control video for the EasyAnimate MODEL.

As ComfyUI's Wan nodes do, each takes the positive / negative CONDITIONING and the VAE, attaches what the model
needs to both (with ``node_helpers.conditioning_set_values``) and returns the LATENT to sample. The latents
attached are in model space (core's ``inpaint_latents`` / ``control_latents`` return them scaled); LATENT holds
raw VAE-space latents, as everywhere in ComfyUI. The MODEL is not an input here, so whether it is an InP or a
Control model is checked when it sees the conditioning (``native_model.conditioning_error``), before any step.
"""

from __future__ import annotations

import comfy.model_management as mm
import node_helpers
import torch
import torch.nn.functional as F

from easyanimate_core.pipeline import (
    CLIP_VERSIONS,
    NOISE_AUG_STRENGTH,
    VideoSize,
    control_latents,
    encoded_mask_inpaint_latents,
    image_to_video_inputs,
    inpaint_latents,
    resized_image,
    snap_size,
    to_model_pixels,
)
from easyanimate_core.vae import VAE_V51, MagvitVAE

from .common import CATEGORY, NATIVE_VERSIONS, frame_rule
from .latents import empty_video_latent, video_size_error
from .vae_nodes import easyanimate_vae

# The augmentation noise on kept pixels (sigma 0.0563) is drawn from this fixed seed so that a node's output
# depends on its inputs only (ComfyUI caches node outputs by their inputs).
AUG_NOISE_SEED = 0


def _common_inputs(video_tooltip: str | None = None) -> dict:
    """The inputs every conditioning node shares (conditioning, VAE, size, batch)."""
    size = "Pixels, a multiple of 16."
    inputs = {
        "positive": ("CONDITIONING", {"tooltip": "The prompt (EasyAnimate Text Encode)."}),
        "negative": ("CONDITIONING", {"tooltip": "The negative prompt (EasyAnimate Text Encode)."}),
        "vae": ("VAE", {"tooltip": "The EasyAnimate VAE (EasyAnimate VAE Loader)."}),
    }
    if video_tooltip:
        inputs["video"] = ("IMAGE", {"tooltip": video_tooltip})
    inputs.update(
        {
            "width": ("INT", {"default": 672, "min": 16, "max": 4096, "step": 16, "tooltip": size}),
            "height": ("INT", {"default": 384, "min": 16, "max": 4096, "step": 16, "tooltip": size}),
            "frames": (
                "INT",
                {
                    "default": 49,
                    "min": 1,
                    "max": 1025,
                    "step": 1,
                    "tooltip": "Video frames: 4k+1 (V5.1 / V5), 8k (V4).",
                },
            ),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Videos per run."}),
        }
    )
    return inputs


def _validate_size(width, height, frames, versions=("V5.1",)) -> bool | str:
    """VALIDATE_INPUTS for width / height / frames: valid for one of ``versions`` (the VAE, unknown here, decides at
    run time: ``_checked_size``). V5 shares V5.1's rules."""
    errors = {version: video_size_error(width, height, frames, [version]) for version in versions}
    if not all(errors.values()):
        return True
    # Versions sharing a rule (V4 and V3: multiples of 8) are named together: "for V4 / V3".
    by_rule: dict[str, list[str]] = {}
    for version, error in errors.items():
        by_rule.setdefault(error.replace(f" for {version};", " for {versions};"), []).append(version)
    return "; ".join(rule.replace("{versions}", " / ".join(names)) for rule, names in by_rule.items())


def _checked_size(core: MagvitVAE, width: int, height: int, frames: int) -> VideoSize:
    """The requested size, refused (not silently snapped) if this VAE's rules differ from the validated ones."""
    size = VideoSize(frames, height, width)
    if snap_size(frames, height, width, core) != size:
        raise ValueError(f"{frames} frames at {width}x{height} do not fit this VAE's frame and size rules")
    return size


def _check_frames(video: torch.Tensor, frames: int, what: str, vae_config=VAE_V51) -> None:
    """A clear error when an IMAGE batch has fewer frames than requested (naming the most the VAE's rule allows)."""
    if video.shape[0] < frames:
        step, offset = frame_rule(vae_config)
        fit = max((video.shape[0] - offset) // step * step + offset, 1)
        raise ValueError(f"the {what} has {video.shape[0]} frames but frames is {frames}: set frames to {fit} or less")


def _load(vae, size: VideoSize) -> torch.device:
    """Put the VAE on its compute device for encoding a video of ``size`` (as its encode does); return the device."""
    shape = (1, 3, size.frames, size.height, size.width)
    memory = vae.memory_used_encode(shape, vae.vae_dtype)
    mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=vae.disable_offload)
    return vae.patcher.load_device


# A VAE built without a loader has no detected version: its chunking mode names the newest release using it.
VERSION_OF_TEMPORAL_MODE = {"mag": "V5.1", "slice": "V4", "v3-slice": "V3", "v2-magvit": "V2", "image": "V1"}


def vae_version(core) -> str:
    """The EasyAnimate version of a core VAE: what its loader detected, else what its chunking mode says."""
    info = getattr(core, "info", None)
    return info.version if info is not None else VERSION_OF_TEMPORAL_MODE[core.config.temporal_mode]


def _latent_shape(latent: dict) -> tuple[int, ...]:
    """The shape of one video of a LATENT (batch 1: conditioning is repeated to the batch by ComfyUI)."""
    return (1, *latent["samples"].shape[1:])


def _attach(positive, negative, values: dict) -> tuple:
    """Both conditionings with ``values`` set (moved to the intermediate device)."""
    values = {k: v.to(mm.intermediate_device()) for k, v in values.items()}
    return (
        node_helpers.conditioning_set_values(positive, values),
        node_helpers.conditioning_set_values(negative, values),
    )


class EasyAnimateImageToVideo:
    """Start and/or end image for an EasyAnimate InP model: mask + masked-video latents on the conditioning.

    With a V4 / V3 VAE and no image it gives those models' official text-to-video conditioning: the all-generate
    mask and video encoded through the VAE (an Empty Latent leaves the model zeros there instead)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_common_inputs(),
                "noise_aug_strength": (
                    "FLOAT",
                    {
                        "default": NOISE_AUG_STRENGTH,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.0001,
                        "round": 0.0001,  # the frontend rounds to the step: 0.0563 must survive
                        "tooltip": "Noise added to the kept images before encoding (official default 0.0563).",
                    },
                ),
            },
            "optional": {
                "start_image": ("IMAGE", {"tooltip": "The first frame (the first image of the batch is used)."}),
                "end_image": ("IMAGE", {"tooltip": "The last frame (the last image of the batch is used)."}),
                "image_encoder": (
                    "EASYANIMATE_IMAGE_ENCODER",
                    {"tooltip": "V4 / V3: the start image's CLIP features (EasyAnimate Image Encoder Loader)."},
                ),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, frames):
        return _validate_size(width, height, frames, ("V5.1", "V4", "V3"))  # the versions with InP models

    def encode(
        self,
        positive,
        negative,
        vae,
        width,
        height,
        frames,
        batch_size,
        noise_aug_strength,
        start_image=None,
        end_image=None,
        image_encoder=None,
    ):
        core = easyanimate_vae(vae)
        # V1-V4 pipelines encode the mask itself through the VAE (posterior samples); V4 and V3 also read CLIP.
        encoded_mask = core.config.temporal_mode != "mag"
        if start_image is None and end_image is None and not encoded_mask:
            raise ValueError(
                "connect a start_image and/or an end_image (for text-to-video use EasyAnimate Empty Latent Video)"
            )
        version = vae_version(core)
        if version in CLIP_VERSIONS and start_image is not None and image_encoder is None:
            raise ValueError(
                f"{version} image-to-video also conditions on the start image's CLIP features: connect an "
                "EasyAnimate Image Encoder Loader on the model folder to image_encoder"
            )
        if image_encoder is not None and version not in CLIP_VERSIONS:
            raise ValueError(f"image_encoder is for V4 / V3 models; disconnect it for this {version} VAE")
        size = _checked_size(core, width, height, frames)
        latent = empty_video_latent(core.config, width, height, frames, batch_size)
        pixels, mask = image_to_video_inputs(
            None if start_image is None else start_image[0, ..., :3],
            None if end_image is None else end_image[-1, ..., :3],
            size,
        )
        device = _load(vae, size)
        generator = torch.Generator().manual_seed(AUG_NOISE_SEED)
        with torch.no_grad():
            if encoded_mask:  # mask and masked video through the VAE, posterior samples (no noise augmentation)
                inpaint = encoded_mask_inpaint_latents(core, pixels, mask, _latent_shape(latent), generator, device)
            else:
                shape = _latent_shape(latent)
                inpaint = inpaint_latents(core, pixels, mask, shape, generator, noise_aug_strength, device)
        positive, negative = _attach(positive, negative, {"easyanimate_inpaint_latents": inpaint})
        if image_encoder is not None and start_image is not None:
            # The conditional branch reads the features, the unconditional one zeros with a zero mask (official).
            # V3's pipeline hands CLIP the start image as given, V4's the image resized to the video.
            image = start_image[0, ..., :3]
            features = image_encoder.encode(image if version == "V3" else resized_image(image, size))
            positive = node_helpers.conditioning_set_values(
                positive, {"easyanimate_clip": features, "easyanimate_clip_weight": torch.ones(1)}
            )
            negative = node_helpers.conditioning_set_values(
                negative, {"easyanimate_clip": torch.zeros_like(features), "easyanimate_clip_weight": torch.zeros(1)}
            )
        return (positive, negative, latent)


class EasyAnimateVideoToVideo:
    """An input video encoded to the LATENT to re-noise and denoise (the sampler's denoise is the strength)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _common_inputs("The source video as IMAGE frames (resized to width x height)."),
            "optional": {
                "mask": (
                    "MASK",
                    {
                        "tooltip": "InP models only: 1 where to generate, 0 where to keep the source video "
                        "(one mask for all frames, or one per frame). Without it every pixel is regenerated."
                    },
                ),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, frames):
        return _validate_size(width, height, frames, NATIVE_VERSIONS)  # any model re-noises a video

    def encode(self, positive, negative, vae, video, width, height, frames, batch_size, mask=None):
        core = easyanimate_vae(vae)
        _check_frames(video, frames, "video", core.config)
        size = _checked_size(core, width, height, frames)
        pixels = to_model_pixels(video[:frames, ..., :3], size)  # RGB (an alpha channel is dropped), [-1, 1]
        with torch.no_grad():  # the VAE's own encode: chunks and tiles planned from free memory, OOM retry, progress
            mean = vae.encode_video((pixels + 1) / 2)
        # The official video-to-video path (no mask) regenerates every pixel: all-zero inpaint latents on an InP
        # model, which the MODEL feeds by itself; nothing is attached then. V4's pipeline draws a posterior sample
        # with the sampling seed, which a node before the sampler cannot know: the mean here (off by the VAE's
        # posterior noise).
        latent = {"samples": mean.float().repeat(batch_size, 1, 1, 1, 1).to(mm.intermediate_device())}
        if mask is None:
            return (positive, negative, latent)
        generate = _video_mask(mask, size)
        device = _load(vae, size)
        generator = torch.Generator().manual_seed(AUG_NOISE_SEED)
        with torch.no_grad():
            if core.config.temporal_mode != "mag":  # V1-V4
                inpaint = encoded_mask_inpaint_latents(core, pixels, generate, _latent_shape(latent), generator, device)
            else:
                inpaint = inpaint_latents(
                    core, pixels, generate, _latent_shape(latent), generator, NOISE_AUG_STRENGTH, device
                )
        return (*_attach(positive, negative, {"easyanimate_inpaint_latents": inpaint}), latent)


def _video_mask(mask: torch.Tensor, size: VideoSize) -> torch.Tensor:
    """ComfyUI MASK [N, H, W] (1 = generate) -> [1, 1, F, H, W] at the video size, binarised at 0.5 as officially."""
    mask = mask.reshape(-1, *mask.shape[-2:]).float()
    if mask.shape[0] == 1:
        mask = mask.expand(size.frames, -1, -1)
    elif mask.shape[0] < size.frames:
        raise ValueError(f"the mask has {mask.shape[0]} frames; give one mask or at least {size.frames}")
    mask = F.interpolate(mask[: size.frames, None], size=(size.height, size.width), mode="bilinear")
    return (mask[:, 0] > 0.5).float()[None, None]


class EasyAnimateControlVideo:
    """A control video (canny, depth, pose, ...) and, for V5.1, a reference image, for an EasyAnimate Control model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _common_inputs("The control video as IMAGE frames (resized to width x height)."),
            "optional": {
                "ref_image": (
                    "IMAGE",
                    {"tooltip": "V5.1 Control models: a reference image for the look (first image of the batch)."},
                ),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, frames):
        return _validate_size(width, height, frames)

    def encode(self, positive, negative, vae, video, width, height, frames, batch_size, ref_image=None):
        _check_frames(video, frames, "control video")
        core = easyanimate_vae(vae)
        size = _checked_size(core, width, height, frames)
        latent = empty_video_latent(core.config, width, height, frames, batch_size)
        # Without a reference image only the control latents are attached; a V5.1 Control model appends the
        # all-zero reference it then reads (native_model.fit_control_latents), a V5 one takes them as they are.
        channels = core.config.latent_channels * (1 if ref_image is None else 2)
        device = _load(vae, size)
        with torch.no_grad():
            control = control_latents(
                core,
                video[:frames, ..., :3],
                None if ref_image is None else ref_image[0, ..., :3],
                _latent_shape(latent),
                channels,
                size,
                device,
            )
        return (*_attach(positive, negative, {"easyanimate_control_latents": control}), latent)


NODE_CLASS_MAPPINGS = {
    "EasyAnimateImageToVideo": EasyAnimateImageToVideo,
    "EasyAnimateVideoToVideo": EasyAnimateVideoToVideo,
    "EasyAnimateControlVideo": EasyAnimateControlVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateImageToVideo": "EasyAnimate Image To Video",
    "EasyAnimateVideoToVideo": "EasyAnimate Video To Video",
    "EasyAnimateControlVideo": "EasyAnimate Control Video",
}
