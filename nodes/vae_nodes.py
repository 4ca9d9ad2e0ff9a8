"""The EasyAnimate VAE in ComfyUI: a stock ``VAE`` (works with VAEDecode / VAEEncode / VAEDecodeTiled), its
loader, and decode / encode nodes with temporal-chunk and spatial-tile inputs.

``EasyAnimateVAE`` is a ``comfy.sd.VAE`` whose ``first_stage_model`` is our core ``MagvitVAE`` (V4-V5.1) or
``ImageVAE`` (V1's SD image VAE, applied frame by frame). ComfyUI's constructor only builds the families it
detects from state-dict keys, so ours sets the same attributes itself. Its decode / encode methods are
overridden rather than left to ComfyUI's generic ones: the MagViT VAE decodes in temporal chunks with causal
caches, identical to a whole-video decode, where ComfyUI's temporal tiles would cut the causal context and
blend seams; both VAEs tile space themselves, plan chunk and tile sizes from free memory (``plan_decode`` of
``easyanimate_core.vae`` or ``easyanimate_core.image_vae``, whichever module models the loaded VAE) and retry
smaller after running out of memory (``decode_with_retry``) instead of failing with the sampled latent lost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils
import folder_paths
import torch

import easyanimate_core.image_vae as image_vae_memory
import easyanimate_core.vae as video_vae_memory
from easyanimate_core.image_vae import ImageVAE
from easyanimate_core.loading import inspect_checkpoint, load_vae
from easyanimate_core.vae import MIN_TILE_LATENTS, ChunkTile, MagvitVAE, decode_with_retry, encode_with_retry

from .common import (
    BUNDLED_TOOLTIP,
    CATEGORY,
    model_file,
    model_folder_path,
    model_folders,
    resolve_in_folders,
    validation_error,
)
from .native_model import EasyAnimateLatentFormat

VAE_FOLDER = "vae"  # ComfyUI's standard folder for single VAE files
AUTO = ChunkTile()  # every chunk / tile setting planned from free memory
NOT_OURS = "this VAE is not an EasyAnimate VAE; load it with EasyAnimate VAE Loader"


def easyanimate_vae(vae) -> MagvitVAE | ImageVAE:
    """The core MagvitVAE / ImageVAE inside a ComfyUI VAE, or a clear error for any other VAE."""
    core = getattr(vae, "first_stage_model", None)
    if not isinstance(core, MagvitVAE | ImageVAE):
        raise ValueError(NOT_OURS)
    return core


def memory_model(core: MagvitVAE | ImageVAE):
    """The module with ``core``'s memory estimates and planners (the same functions in each): image_vae's work per
    frame, vae's per causal chunk. The out-of-memory retries (vae.py) serve both."""
    return image_vae_memory if isinstance(core, ImageVAE) else video_vae_memory


def _oom_errors() -> tuple[type[BaseException], ...]:
    """The out-of-memory exceptions to retry on: torch's and ComfyUI's (never a catch-all ``Exception``)."""
    errors = {torch.OutOfMemoryError, getattr(mm, "OOM_EXCEPTION", torch.OutOfMemoryError)}
    return tuple(e for e in errors if e is not Exception)


def _on_retry(what: str):
    def log_and_free(settings: ChunkTile, error: str) -> None:
        logging.warning(
            "EasyAnimate VAE %s ran out of memory (%s); retrying with chunk %s, tile %s latent pixels",
            what,
            error,
            settings.chunk,
            settings.tile,
        )
        mm.soft_empty_cache()

    return log_and_free


def _progress():
    """A ``progress(done, total)`` callback: interrupt check between chunks and a ComfyUI progress bar."""
    bar = comfy.utils.ProgressBar(1)  # the total is set by the first update

    def progress(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return progress


class _NoEmptyVAEWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No VAE weights detected" not in record.getMessage()


class EasyAnimateVAE(comfy.sd.VAE):
    """ComfyUI's VAE type over our MagViT or image VAE; LATENT holds raw VAE-space latents [B, C, T, h, w]."""

    def __init__(self, vae: MagvitVAE | ImageVAE, device=None, dtype=None):
        # ComfyUI's own constructor first, on an empty state dict: it sets every attribute the running ComfyUI's VAE
        # has (0.8.0 added size, pad_channel_value, ... that its model_size() / get_ram_usage() read) and stops at
        # "no VAE weights" (that warning is dropped). Then its attributes get the values of our video VAE.
        quiet, root = _NoEmptyVAEWarning(), logging.getLogger()
        root.addFilter(quiet)
        try:
            super().__init__(sd={}, device=device, dtype=dtype)
        finally:
            root.removeFilter(quiet)
        cfg, memory = vae.config, memory_model(vae)
        s, tc = cfg.spatial_compression, cfg.temporal_compression
        self.memory_used_encode = lambda shape, dtype: memory.encode_memory(cfg, shape, dtype)
        self.memory_used_decode = lambda shape, dtype: memory.decode_memory(cfg, shape, dtype)
        self.downscale_ratio = (lambda frames: vae.latent_frames(frames) if frames > 0 else 0, s, s)
        self.upscale_ratio = (lambda latents: vae.video_frames(latents) if latents > 0 else 0, s, s)
        self.downscale_index_formula = (tc, s, s)
        self.upscale_index_formula = (tc, s, s)
        self.latent_channels = cfg.latent_channels
        self.latent_dim = 3
        self.output_channels = cfg.out_channels
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.working_dtypes = [torch.bfloat16, torch.float32]  # the official pipelines run the VAE in bf16
        self.disable_offload = False
        self.not_video = False
        self.extra_1d_channel = None
        self.crop_input = False  # frame and size rules are refused with the nearest valid values, not cropped
        self.first_stage_model = vae.eval()
        self.device = mm.vae_device() if device is None else device
        self.vae_dtype = next(vae.parameters()).dtype if dtype is None else dtype
        self.output_device = mm.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(
            vae, load_device=self.device, offload_device=mm.vae_offload_device()
        )

    # ---- decode ----------------------------------------------------------------------------------

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raise ValueError unless ``latents`` are video latents this VAE decodes."""
        c = self.latent_channels
        if latents.ndim != 5 or latents.shape[1] != c:
            raise ValueError(
                f"expected video latents [B, {c}, T, h, w], got {list(latents.shape)}; "
                "decode image or other models' latents with their own VAE"
            )

    def decode_video(self, latents: torch.Tensor, requested: ChunkTile = AUTO) -> torch.Tensor:
        """Latents [B, C, T, h, w] -> frames [B, F, H, W, 3] in [0, 1] on the output device.

        ``None`` fields of ``requested`` are planned from free memory after the VAE is loaded.
        """
        self.throw_exception_if_invalid()
        self.check_latents(latents)
        vae = self.first_stage_model
        memory = memory_model(vae)
        shape, dtype = tuple(latents.shape), self.vae_dtype
        mm.load_models_gpu(
            [self.patcher],
            memory_required=memory.decode_memory(vae.config, shape, dtype, requested.chunk, requested.tile),
            minimum_memory_required=memory.decode_memory(vae.config, shape, dtype, 1, MIN_TILE_LATENTS),
            force_full_load=self.disable_offload,
        )
        device = self.patcher.load_device
        b, _, t, h, w = shape
        s = vae.config.spatial_compression
        # Frames are written straight into the IMAGE layout [B, F, H, W, 3]; decode sees it as [B, 3, F, H, W].
        frames = torch.empty(b, vae.video_frames(t), h * s, w * s, 3, device=self.output_device)
        budget = mm.get_free_memory(device)
        if torch.device(self.output_device) == torch.device(device):
            budget -= frames.numel() * frames.element_size()
        settings = memory.plan_decode(vae, shape, dtype, budget, requested)
        decode_with_retry(
            vae,
            latents.to(device),
            settings,
            out=frames.permute(0, 4, 1, 2, 3),
            progress=_progress(),
            oom_errors=_oom_errors(),
            on_retry=_on_retry("decode"),
        )
        return frames.add_(1.0).div_(2.0).clamp_(0.0, 1.0)  # process_output, in place

    def decode(self, samples_in, vae_options={}):  # noqa: B006 (ComfyUI's signature)
        return self.decode_video(samples_in)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """VAEDecodeTiled: spatial tiles (latent pixels) and ``tile_t`` latents per temporal chunk.

        ``overlap_t`` is not needed: chunks are decoded with the previous chunk's causal caches, exactly.
        """
        sides = [v for v in (tile_x, tile_y) if v]
        tile = min(sides) if sides else None
        if tile is not None and overlap is not None:
            overlap = min(overlap, tile // 4)
        chunk = tile_t if tile_t and self.first_stage_model.frame_local else None
        return self.decode_video(samples, ChunkTile(chunk, tile, overlap))

    # ---- encode ----------------------------------------------------------------------------------

    def video_from_images(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        """IMAGE frames [F, H, W, C] (one video) or [B, F, H, W, C] -> [B, 3, F, H, W] in [0, 1]."""
        pixels = pixel_samples[..., :3]
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(0)
        if pixels.ndim != 5:
            raise ValueError(f"expected IMAGE frames [frames, H, W, 3], got {list(pixel_samples.shape)}")
        return pixels.movedim(-1, 1)

    def encode_video(self, video: torch.Tensor, requested: ChunkTile = AUTO) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [0, 1] -> posterior-mean VAE-space latents [B, C, T, h, w] on the output device."""
        self.throw_exception_if_invalid()
        vae = self.first_stage_model
        vae.check_video_shape(video.shape)  # frame / size rules, naming the nearest valid values
        memory = memory_model(vae)
        shape, dtype = tuple(video.shape), self.vae_dtype
        tc = vae.config.temporal_compression
        mm.load_models_gpu(
            [self.patcher],
            memory_required=memory.encode_memory(vae.config, shape, dtype, requested.chunk, requested.tile),
            minimum_memory_required=memory.encode_memory(vae.config, shape, dtype, tc, MIN_TILE_LATENTS),
            force_full_load=self.disable_offload,
        )
        device = self.patcher.load_device
        pixels = self.process_input(video.to(device, dtype))
        budget = mm.get_free_memory(device)
        settings = memory.plan_encode(vae, shape, dtype, budget, requested)
        mean = encode_with_retry(
            vae, pixels, settings, progress=_progress(), oom_errors=_oom_errors(), on_retry=_on_retry("encode")
        )
        return mean.to(self.output_device)

    def encode(self, pixel_samples):
        return self.encode_video(self.video_from_images(pixel_samples))

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """VAEEncodeTiled: tiles and overlap in pixels, ``tile_t`` frames per chunk (a multiple of the VAE's
        temporal compression: 4 for the MagViT VAE, 1 for the image VAE)."""
        return self.encode_video(
            self.video_from_images(pixel_samples), self._encode_tiles(tile_x, tile_y, overlap, tile_t)
        )

    def encode_tiled_3d(self, samples, tile_t=9999, tile_x=512, tile_y=512, overlap=(1, 64, 64)):
        """ComfyUI's 3-D tiling helper (video [B, 3, F, H, W] in [0, 1]) on our encode, whose core returns the
        posterior (mean, logvar) that ComfyUI's generic helper cannot tile."""
        return self.encode_video(samples, self._encode_tiles(tile_x, tile_y, overlap[-1], tile_t))

    def _encode_tiles(self, tile_x, tile_y, overlap, tile_t) -> ChunkTile:
        """Encode chunk and tile settings from ComfyUI's pixel tile sizes and frames per chunk."""
        s = self.first_stage_model.config.spatial_compression
        tc = self.first_stage_model.config.temporal_compression
        sides = [v // s for v in (tile_x, tile_y) if v]
        tile = max(1, min(sides)) if sides else None
        overlap = None if overlap is None or tile is None else min(overlap // s, tile // 4)
        chunk = max(tc, tile_t // tc * tc) if tile_t and self.first_stage_model.frame_local else None
        return ChunkTile(chunk, tile, overlap)


# ---- loader ----------------------------------------------------------------------------------------


def _vae_files() -> list[str]:
    """The .safetensors files in ComfyUI's vae/ folder (pickle files are never loaded)."""
    return [f for f in folder_paths.get_filename_list(VAE_FOLDER) if f.endswith((".safetensors", ".sft"))]


def _vae_path(name: str) -> Path:
    """A VAE-loader choice: a folder under models/EasyAnimate/ with vae/, else a file in vae/."""
    if name in model_folders("vae"):
        return model_folder_path(name)
    return model_file(VAE_FOLDER, name)


def _single_vae_error(name: str) -> str | None:
    """Why the vae/ file ``name`` is not a loadable EasyAnimate VAE (None if it is)."""
    if name in model_folders("vae"):
        model_folder_path(name)  # refuses a link out of the model folders
        return None
    path = resolve_in_folders(VAE_FOLDER, name, Path.is_file)
    if path is None:
        return f"{name!r} is neither a folder under models/EasyAnimate/ with a vae/ subfolder nor a file in vae/"
    try:
        inspect_checkpoint(path, "vae")
    except Exception as error:  # any header that core's detection cannot read is another family
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"vae/{name} is not an EasyAnimate VAE ({first}); load other VAEs with ComfyUI's VAELoader (Load VAE)"
    return None


class EasyAnimateVAELoader:
    """Load the VAE of an EasyAnimate checkpoint folder or of a single file in vae/ (the MagViT VAE of V4-V5.1 or
    V1's SD image VAE), as ComfyUI's VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        tooltip = (
            "An EasyAnimate VAE: a folder under models/EasyAnimate/ with a vae/ subfolder, or a .safetensors file "
            "in models/vae/ (V5 / V5.1 / V4 and V1's image VAE are detected from the tensors). " + BUNDLED_TOOLTIP
        )
        return {"required": {"model_folder": (model_folders("vae") + _vae_files(), {"tooltip": tooltip})}}

    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("ComfyUI's VAE type: use it with VAEDecode / VAEEncode too.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, model_folder):
        return validation_error(lambda: _single_vae_error(model_folder))

    def load(self, model_folder):
        path = _vae_path(model_folder)
        device = mm.vae_device()
        dtype = mm.vae_dtype(device, [torch.bfloat16, torch.float32])
        # comfy.ops layers without weight init: ComfyUI can stream them when the VAE does not fit (lowvram).
        core = load_vae(path, dtype=dtype, device=mm.vae_offload_device(), operations=comfy.ops.disable_weight_init)
        if core.config.latent_channels == EasyAnimateLatentFormat.latent_channels:
            EasyAnimateLatentFormat.recent_vae = path  # preview colours for models loaded without a vae/ folder
        return (EasyAnimateVAE(core, device=device, dtype=dtype),)


# ---- decode / encode nodes -------------------------------------------------------------------------


def _memory_inputs(chunk_unit: str, chunk_step: int) -> dict:
    return {
        "temporal_chunk": (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": 4096,
                "step": chunk_step,
                "tooltip": f"{chunk_unit} per chunk; 0 = auto (from free memory). A memory knob: the result is the "
                "same for every chunk size.",
            },
        ),
        "tile_size": (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": 4096,
                "step": 64,
                "tooltip": "Spatial tile side in pixels; 0 = auto (untiled when it fits in free memory).",
            },
        ),
        "tile_overlap": (
            "INT",
            {
                "default": 64,
                "min": 0,
                "max": 1024,
                "step": 8,
                "tooltip": "Overlap of neighbouring tiles in pixels (at most a quarter tile), blended linearly; "
                "automatic tiles overlap by a quarter tile.",
            },
        ),
    }


def _requested(core: MagvitVAE | ImageVAE, temporal_chunk: int, tile_size: int, tile_overlap: int) -> ChunkTile:
    """Node inputs (0 = auto; tiles in pixels) -> ChunkTile in the VAE's units."""
    s = core.config.spatial_compression
    tile = max(1, tile_size // s) if tile_size else None
    overlap = min(tile_overlap // s, tile // 4) if tile else None
    return ChunkTile(temporal_chunk or None, tile, overlap)


class EasyAnimateVAEDecode:
    """Decode a video LATENT with the EasyAnimate VAE (MagViT or V1's image VAE) to IMAGE frames [frames, H, W, 3]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": (
                    "LATENT",
                    {"tooltip": "Video latents [B, C, T, h, w] from KSampler (16 channels for V4-V5.1, 4 for V1)."},
                ),
                "vae": ("VAE", {"tooltip": "From EasyAnimate VAE Loader."}),
            },
            "optional": _memory_inputs("Latents (4 frames each; one frame each for V1's image VAE)", 1),
        }

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The frames of every video in the batch, one after another.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples, vae, temporal_chunk=0, tile_size=0, tile_overlap=64):
        core = easyanimate_vae(vae)
        if temporal_chunk and not core.frame_local:
            raise ValueError("this VAE decodes in fixed chunks; set temporal_chunk to 0 (auto)")
        frames = vae.decode_video(samples["samples"], _requested(core, temporal_chunk, tile_size, tile_overlap))
        return (frames.reshape(-1, *frames.shape[2:]),)


class EasyAnimateVAEEncode:
    """Encode IMAGE frames (sides a multiple of 16; 4k+1 frames for the MagViT VAE, any count for V1's image VAE)
    to a video LATENT with the EasyAnimate VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": (
                    "IMAGE",
                    {
                        "tooltip": "Video frames [frames, H, W, 3]: sides multiples of 16; 4k+1 frames (V4-V5.1), "
                        "any number (V1)."
                    },
                ),
                "vae": ("VAE", {"tooltip": "From EasyAnimate VAE Loader."}),
            },
            "optional": _memory_inputs("Frames after the first (a multiple of 4; any number for V1's image VAE)", 4),
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Raw VAE-space latents [1, C, T, h, w] (the posterior mean).",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, pixels, vae, temporal_chunk=0, tile_size=0, tile_overlap=64):
        core = easyanimate_vae(vae)
        tc = core.config.temporal_compression
        if temporal_chunk and (temporal_chunk % tc or not core.frame_local):
            raise ValueError(f"temporal_chunk must be 0 (auto) or a multiple of {tc}, got {temporal_chunk}")
        video = vae.video_from_images(pixels)
        try:
            core.check_video_shape(video.shape)
        except ValueError as error:
            raise ValueError(f"EasyAnimate VAE Encode: {error}") from None
        latents = vae.encode_video(video, _requested(core, temporal_chunk, tile_size, tile_overlap))
        return ({"samples": latents},)


NODE_CLASS_MAPPINGS = {
    "EasyAnimateVAELoader": EasyAnimateVAELoader,
    "EasyAnimateVAEDecode": EasyAnimateVAEDecode,
    "EasyAnimateVAEEncode": EasyAnimateVAEEncode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateVAELoader": "EasyAnimate VAE Loader",
    "EasyAnimateVAEDecode": "EasyAnimate VAE Decode",
    "EasyAnimateVAEEncode": "EasyAnimate VAE Encode",
}
