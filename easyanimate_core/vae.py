"""EasyAnimate's MagViT-style causal 3-D video VAE (``AutoencoderKLMagvit``): V2, V3, V4 "slice", V5 / V5.1 "mag".

One block graph serves all five released VAEs (spec ``easyanimate_arch.md`` §2); what differs is the
latent width, the optional mid-block attention and how a video is cut into temporal chunks:

* ``temporal_mode="mag"`` (V5, V5.1; official ``cache_mag_vae``): frame 0 is encoded alone, then chunks
  of 4 frames; latent 0 is decoded alone, then chunks of latents. Every 3-D convolution is causal and
  carries the last input frames of the previous chunk (its *cache*), so the whole model is causal and,
  with ``spatial_group_norm`` (GroupNorm per frame), the chunk size does not change a single number.
* ``temporal_mode="slice"`` (V4; official ``cache_compression_vae``): the encoder sees independent
  chunks of 8 frames with zero ("same") temporal padding (frame 0 alone first when the count is odd);
  the decoder works on pairs of latents, causal with caches across pairs, and its GroupNorm statistics
  and "3d" attention span the whole pair, so the pair size is part of the model.
* ``temporal_mode="v2-magvit"`` (V2; official ``slice_compression_vae`` false, chunked by the pipeline):
  every chunk of 9 frames (3 latents) is an independent causal call -- replicate padding from the chunk's own
  first frame, no cache -- and each temporal upsampler keeps that first frame once (t latents -> 4t-3 frames).
* ``temporal_mode="v3-slice"`` (V3; official ``slice_compression_vae``): the encoder is V4's (independent
  8-frame chunks, zero padding); the decoder runs each pair of latents on its own with zero padding, except
  that ``conv_in`` and the mid block also see the previous and the next pair ("features share") and keep
  the pair's own frames.

V2 and V3 ``decode`` end like the official pipelines' ``decode_latents``: clamp to [-1, 1], then
``smooth_output`` -- re-encode the decoded video without its first and last half encoder chunk, decode it
again and average it into the middle -- then clamp again.

Scaling convention: ``encode`` returns the raw posterior moments; the caller multiplies the mean by
``config.scaling_factor`` before handing it to the DiT, and ``decode`` expects latents that the caller
has already divided by ``config.scaling_factor``. The VAE never applies the factor itself.

Caches are plain attributes (never buffers, so never in the state dict); they are cleared at the
start of every ``encode``/``decode`` and again in a ``finally``, so an exception (or an interrupt
raised from the ``progress`` callback) cannot leak state into the next call.

Memory: ``decode`` writes into one preallocated output and, for the mag VAE with per-frame norm, runs
every decoder stage one frame at a time (a nearest 2x temporal upsample runs the rest of the decoder
twice on the same frame instead of copying it). The peak is then the conv caches (two input frames
per conv, about 0.9 GiB for 256x256 at the released size, the same as any cached implementation)
plus one high-resolution frame's activations, whatever the video length.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .ops import default_operations

ProgressFn = Callable[[int, int], None]

SPATIAL_DOWN = "SpatialDownBlock3D"
SPATIOTEMPORAL_DOWN = "SpatialTemporalDownBlock3D"
SPATIAL_UP = "SpatialUpBlock3D"
SPATIOTEMPORAL_UP = "SpatialTemporalUpBlock3D"


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

TEMPORAL_MODES = ("mag", "slice", "v2-magvit", "v3-slice")


def _chunk_sizes(total: int, size: int) -> list[int]:
    """Lengths of consecutive chunks of ``size`` covering ``total`` (the last one may be shorter)."""
    return [min(size, total - s) for s in range(0, total, size)]


@dataclass(frozen=True)
class VAEConfig:
    """Every hyperparameter of the VAE; build one with a preset, ``replace`` or :meth:`from_dict`."""

    in_channels: int = 3
    latent_channels: int = 16
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    down_block_types: tuple[str, ...] = (SPATIAL_DOWN, SPATIOTEMPORAL_DOWN, SPATIOTEMPORAL_DOWN, SPATIOTEMPORAL_DOWN)
    up_block_types: tuple[str, ...] = (SPATIAL_UP, SPATIOTEMPORAL_UP, SPATIOTEMPORAL_UP, SPATIOTEMPORAL_UP)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    act_fn: str = "silu"
    scaling_factor: float = 0.7125
    # True: every resnet / output GroupNorm (mid blocks included) normalises each frame on its own.
    spatial_group_norm: bool = True
    # None, "spatial" (attention within each frame, V5) or "3d" (over all t*h*w positions, V4).
    mid_block_attention: str | None = None
    # "mag" (cache_mag_vae, V5/V5.1), "slice" (cache_compression_vae, V4), "v2-magvit" (V2) or
    # "v3-slice" (slice_compression_vae, V3); see the module docstring.
    temporal_mode: str = "mag"
    # Frames per encoder chunk after frame 0 (mag) / per independent chunk (slice, v2-magvit, v3-slice).
    mini_batch_encoder: int = 4
    # Latents per decoder chunk after latent 0 (mag) / per cached pair (slice) / per independent chunk (v2, v3).
    mini_batch_decoder: int = 1
    # Pixel height/width must be a multiple of this: 8x VAE compression times the DiT's 2x2 patch.
    pixel_multiple: int = 16

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a valid pixel frame count (mag: frame 0 alone, then t per latent; slice: t per latent)."""
        if self.temporal_mode == "mag":
            return (frames - 1) // self.temporal_compression + 1
        if self.temporal_mode == "v2-magvit":  # independent chunks: 9 frames -> 3 latents, 1 -> 1
            return sum(self.chunk_latents(n) for n in _chunk_sizes(frames, self.mini_batch_encoder))
        if self.temporal_mode == "v3-slice":  # an odd count encodes frame 0 alone first
            odd = frames % 2
            return odd + sum(self.chunk_latents(n) for n in _chunk_sizes(frames - odd, self.mini_batch_encoder))
        return 1 if frames == 1 else frames // self.temporal_compression  # 8 frames -> 2 latents

    def video_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames`` latents."""
        tc = self.temporal_compression
        if self.temporal_mode == "mag":
            return tc * (latent_frames - 1) + 1
        if self.temporal_mode == "v2-magvit":  # each chunk keeps its first frame once: 3 latents -> 9 frames
            return sum(tc * (n - 1) + 1 for n in _chunk_sizes(latent_frames, self.mini_batch_decoder))
        if self.temporal_mode == "v3-slice":  # an odd count decodes latent 0 alone, to one frame
            odd = latent_frames % 2
            return odd + tc * (latent_frames - odd)
        return 1 if latent_frames == 1 else tc * latent_frames

    def chunk_latents(self, frames: int) -> int:
        """Latents one encoder call makes of ``frames`` frames: each stride-2 conv keeps (t-1)//2+1 of t."""
        for _ in range(self.temporal_compression.bit_length() - 1):
            frames = (frames - 1) // 2 + 1
        return frames

    def nearest_frames(self, frames: int) -> tuple[int, str]:
        """The nearest valid video length not above ``frames`` (at least 1), and the rule as text."""
        if self.temporal_mode == "mag":
            tc = self.temporal_compression
            return max((frames - 1) // tc * tc + 1, 1), f"{tc}k+1"
        # slice / v3-slice: the official pipelines take video_length // 8 * 8; v2-magvit the same with 9
        m = self.mini_batch_encoder
        return (frames // m * m if frames >= m else 1), f"1 or a multiple of {m}"

    def check_video_size(self, frames: int, height: int, width: int) -> None:
        """Raise ValueError naming the nearest valid values unless this VAE encodes videos of this size."""
        if self.temporal_mode == "mag" and (frames < 1 or (frames - 1) % self.temporal_compression != 0):
            tc = self.temporal_compression
            raise ValueError(
                f"{frames} frames: the mag VAE expects {tc}k+1 frames; "
                f"nearest valid: {nearest_multiples(frames, tc, 1)}"
            )
        if self.temporal_mode != "mag" and frames != 1 and (frames < 1 or frames % self.mini_batch_encoder != 0):
            m = self.mini_batch_encoder
            raise ValueError(
                f"{frames} frames: the {self.temporal_mode} VAE expects a multiple of {m} frames (or 1); "
                f"nearest valid: {nearest_multiples(frames, m)}"
            )
        for name, size in (("height", height), ("width", width)):
            if size % self.pixel_multiple != 0 or size <= 0:
                raise ValueError(
                    f"{name} {size} is not a multiple of {self.pixel_multiple}; "
                    f"nearest valid: {nearest_multiples(size, self.pixel_multiple)}"
                )

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"need one down and one up block type per block_out_channels entry ({n})")
        if self.mid_block_attention not in (None, "spatial", "3d"):
            raise ValueError(f"mid_block_attention must be None, 'spatial' or '3d', got {self.mid_block_attention!r}")
        if self.temporal_mode not in TEMPORAL_MODES:
            raise ValueError(f"temporal_mode must be one of {TEMPORAL_MODES}, got {self.temporal_mode!r}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn {self.act_fn!r} is not supported (the released VAEs use 'silu')")

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along height and width (8 for the released VAEs)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_compression(self) -> int:
        """Frames per latent after the first (4): one factor 2 per spatio-temporal downsampler."""
        last = len(self.down_block_types) - 1
        return 2 ** sum(t == SPATIOTEMPORAL_DOWN for i, t in enumerate(self.down_block_types) if i != last)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Build from a diffusers or an official ``vae/config.json`` dict; unknown keys are ignored.

        Missing keys take the diffusers defaults (V5.1). A config saved by the official class lists
        every constructor argument, so its own defaults never have to be guessed here.
        """
        d = dict(d)
        kw: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for key in names:
            if key in d and d[key] is not None:
                kw[key] = d[key]
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            if isinstance(kw.get(key), str):  # the official class accepts stringified lists
                kw[key] = ast.literal_eval(kw[key])
        if d.get("block_out_channels") is None and "ch_mult" in d:
            kw["block_out_channels"] = [int(d.get("ch", 128)) * m for m in d["ch_mult"]]
        n_blocks = len(kw.get("block_out_channels", cls.block_out_channels))
        if "down_block_types" not in kw and n_blocks != len(cls.down_block_types):
            kw["down_block_types"] = [SPATIAL_DOWN] + [SPATIOTEMPORAL_DOWN] * (n_blocks - 1)
        if "up_block_types" not in kw and n_blocks != len(cls.up_block_types):
            kw["up_block_types"] = [SPATIAL_UP] + [SPATIOTEMPORAL_UP] * (n_blocks - 1)
        if d.get("mid_block_use_attention", False):
            if d.get("mid_block_type", "MidBlock3D") != "MidBlock3D":
                raise ValueError(f"unsupported mid_block_type {d['mid_block_type']!r}")
            kw["mid_block_attention"] = d.get("mid_block_attention_type", "3d")
        elif "mid_block_use_attention" in d:
            kw["mid_block_attention"] = None
        if d.get("cache_compression_vae", False):
            kw["temporal_mode"] = "slice"
        elif d.get("cache_mag_vae", False):
            kw["temporal_mode"] = "mag"
        elif d.get("slice_mag_vae", False):
            raise ValueError(
                "only cache_mag_vae (V5/V5.1), cache_compression_vae (V4) and slice_compression_vae (V3) or "
                "unsliced (V2) VAEs are supported; this config.json sets slice_mag_vae, which no release uses"
            )
        elif d.get("slice_compression_vae", False):
            kw = {**_era_defaults(VAE_V3), **kw, "temporal_mode": "v3-slice"}
        elif "cache_mag_vae" in d or "cache_compression_vae" in d:
            # A V4-or-later class config with every chunking flag off: the official class then encodes the
            # whole video in one call, which no release does.
            raise ValueError(
                "this config.json turns off cache_mag_vae, cache_compression_vae and slice_compression_vae; "
                "no released VAE does that, so set the flag of the release the weights belong to"
            )
        elif "slice_compression_vae" in d:  # the V2/V3-era class with slicing off: V2's pipeline-chunked VAE
            # scaling_factor: the V2 release's pipeline and trainer use 0.18215 whatever config.json says.
            kw = {**_era_defaults(VAE_V2), **kw, "temporal_mode": "v2-magvit", "scaling_factor": VAE_V2.scaling_factor}
        return cls(**kw)


def _era_defaults(preset: VAEConfig) -> dict[str, Any]:
    """What a V2/V3-era config.json leaves out: that class has no per-frame norm and defaults to latent 4 and
    one "3d" mid attention (a config it saved lists its own arguments, so only those are read from it)."""
    return {f.name: getattr(preset, f.name) for f in fields(preset)}


# V5.1: diffusers' AutoencoderKLMagvit (released vae/config.json), no mid-block attention.
VAE_V51 = VAEConfig()
# V5: as V5.1 plus one per-frame ("spatial") attention in each mid block (file size confirms it, §2.2).
VAE_V5 = replace(VAE_V51, mid_block_attention="spatial")
# V4 "slice VAE": latent 4, chunk-wide GroupNorm, "3d" mid attention, independent 8-frame encoder chunks,
# cached 2-latent decoder chunks. scaling_factor is the official class default 0.1825 (spec §10.7);
# the real V4 vae/config.json was not seen, so always prefer VAEConfig.from_dict on the checkpoint's.
VAE_V4 = replace(
    VAE_V51,
    latent_channels=4,
    scaling_factor=0.1825,
    spatial_group_norm=False,
    mid_block_attention="3d",
    temporal_mode="slice",
    mini_batch_encoder=8,
    mini_batch_decoder=2,
)
# V3 "slice VAE" (slice_compression_vae): V4's graph and encoder, features-share decoder pairs. Chunk sizes are
# the VAE training config autoencoder_kl_32x32x4_slice.yaml's and the V3 yaml's before f9eeabe
# (slice_compression_vae true, mini_batch_encoder 8); the released vae/config.json was not seen, so
# scaling_factor is the class default 0.1825 that the V3 pipeline reads from it (inferred).
VAE_V3 = replace(VAE_V4, temporal_mode="v3-slice")
# V2: the same graph, chunked by the pipeline into independent calls of 9 frames / 3 latents (the class
# defaults and the V2 yaml's mini_batch_encoder 9). scaling_factor 0.18215 is what the V2 release's
# pipeline and trainer hard-code (fb0916f decode_latents, train_t2iv.py), whatever config.json says.
VAE_V2 = replace(VAE_V4, temporal_mode="v2-magvit", mini_batch_encoder=9, mini_batch_decoder=3, scaling_factor=0.18215)
PRESETS = {"v2": VAE_V2, "v3": VAE_V3, "v4": VAE_V4, "v5": VAE_V5, "v5.1": VAE_V51}


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkMode:
    """How the current temporal chunk is processed (the official code's per-module ``padding_flag``)."""

    # True: causal -- prepend each conv's cache (copies of frame 0 when empty) and refresh it.
    # False: "same" zero padding of one frame on both sides, no cache (slice encoder, single frame).
    causal: bool
    # Whether spatio-temporal upsamplers double the frame count (all chunks but a lone first one).
    upsample_time: bool
    # True: an independent causal call (official flag 0, V2's pipeline chunks): every conv pads with copies of
    # the chunk's own first frame and keeps no cache, and temporal upsamplers keep that first frame once.
    standalone: bool = False


MAG_FIRST = ChunkMode(causal=True, upsample_time=False)  # official flag 3
CAUSAL_NEXT = ChunkMode(causal=True, upsample_time=True)  # flags 4, 5, 6 (5 = 6 with an empty cache)
SAME_SINGLE = ChunkMode(causal=False, upsample_time=False)  # flag 1
SAME_CHUNK = ChunkMode(causal=False, upsample_time=True)  # flag 2
STANDALONE = ChunkMode(causal=True, upsample_time=True, standalone=True)  # flag 0


def _stack_time(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [B,C,t,H,W] parts along time; channels-last on CPU.

    oneDNN convolves channels-last input directly, while a contiguous (NCDHW) input is first
    reordered into a scratch copy as large as the input: written this way the conv input exists once
    (measured on 256x256 frames: the peak of the largest conv drops from 2x to 1x its input).
    """
    b, c, _, h, w = parts[0].shape
    t = sum(p.shape[2] for p in parts)
    if parts[0].device.type != "cpu" or b * c * t * h * w < _CHANNELS_LAST_MIN_NUMEL:
        return torch.cat(parts, dim=2)
    ext = torch.empty((b, c, t, h, w), dtype=parts[0].dtype, device=parts[0].device, memory_format=_CHANNELS_LAST)
    start = 0
    for p in parts:
        ext[:, :, start : start + p.shape[2]] = p
        start += p.shape[2]
    return ext


_CHANNELS_LAST = torch.channels_last_3d
# Below this size the scratch copy is small and the plain layout convolves faster.
_CHANNELS_LAST_MIN_NUMEL = 1 << 22


class CausalTime:
    """Temporal padding and chunk-to-chunk cache of a kt=3 conv; mixed into each namespace's Conv3d."""

    def _setup_time(self, time_stride: int) -> None:
        self.time_stride = time_stride
        self.time_pad = 2  # (kt - 1) * dilation: the conv looks at this many past frames
        # A stride-2 conv's windows start on even positions, so after a chunk of odd extended length
        # only its last frame belongs to the next window; a stride-1 conv needs the last two.
        self.time_keep = self.time_pad if time_stride == 1 else self.time_pad - 1
        # The last `time_keep` input frames, each [B,C,1,H,W]. Plain attribute: never in the state dict.
        self.cache: tuple[torch.Tensor, ...] = ()

    def pad_time(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:
        """``x`` [B,C,T,H,W] with its temporal context in front (and behind, "same"); refreshes the cache."""
        if not mode.causal:
            return F.pad(x, (0, 0, 0, 0, 1, 1))  # zeros, one frame each side
        if mode.standalone:  # the official replicate padding of an independent call; nothing carried over
            return _stack_time([x[:, :, :1]] * self.time_pad + [x])
        # A single frame that owns its storage (the frame-by-frame decoder's case) is cached by
        # reference, without a copy; slices of anything larger are copied so they cannot pin it.
        owned = x.shape[2] == 1 and x.untyped_storage().nbytes() == x.numel() * x.element_size()
        if self.cache:
            past = [f.to(x.dtype) for f in self.cache]
        else:  # causal start: copies of the first frame (the reference's replicate padding)
            first = x[:, :, :1] if owned else x[:, :, :1].clone()
            past = [first] * self.time_pad
        ext = _stack_time([*past, x])  # [B, C, len(past) + T, H, W]
        last = range(max(0, x.shape[2] - self.time_keep), x.shape[2])
        new = [x[:, :, t : t + 1] if owned else x[:, :, t : t + 1].clone() for t in last]
        self.cache = tuple((past + new)[-self.time_keep :])
        return ext

    def conv_padded(self, x: torch.Tensor) -> torch.Tensor:
        """The plain conv over an already time-padded input (one call, not one per window)."""
        return super().forward(x)

    def forward(self, x: torch.Tensor, mode: ChunkMode = CAUSAL_NEXT) -> torch.Tensor:
        return self.conv_padded(self.pad_time(x, mode))


@functools.cache
def causal_conv3d_class(conv3d: type) -> type:
    """``CausalConv3d`` built on an ``operations.Conv3d`` (so weights stay at ``<name>.weight``)."""

    class CausalConv3d(CausalTime, conv3d):
        """kt x 3 x 3 conv with causal, cached temporal padding (spatial padding is the conv's own)."""

        def __init__(self, cin, cout, *, stride=(1, 1, 1), spatial_padding=1, dtype=None, device=None):
            super().__init__(
                cin, cout, 3, stride=stride, padding=(0, spatial_padding, spatial_padding), dtype=dtype, device=device
            )
            self._setup_time(stride[0])

    return CausalConv3d


def _group_norm(norm: nn.Module, x: torch.Tensor, per_frame: bool) -> torch.Tensor:
    """GroupNorm over the whole chunk, or each frame on its own (time folded into batch)."""
    if not per_frame:
        return norm(x)
    b = x.shape[0]
    y = norm(x.transpose(1, 2).flatten(0, 1))  # [B*T, C, H, W]
    return y.unflatten(0, (b, -1)).transpose(1, 2)  # [B, C, T, H, W]


class _Ctx:
    """Constructor arguments shared by every layer: namespace, dtype, device, norm settings."""

    def __init__(self, ops, dtype, device, cfg: VAEConfig):
        self.ops, self.dtype, self.device, self.cfg = ops, dtype, device, cfg
        self.CausalConv3d = causal_conv3d_class(ops.Conv3d)

    def conv(self, cin, cout, stride=(1, 1, 1), spatial_padding=1):
        return self.CausalConv3d(
            cin, cout, stride=stride, spatial_padding=spatial_padding, dtype=self.dtype, device=self.device
        )

    def pointwise(self, cin, cout):
        return self.ops.Conv3d(cin, cout, 1, dtype=self.dtype, device=self.device)

    def norm(self, channels):
        cfg = self.cfg
        return self.ops.GroupNorm(
            cfg.norm_num_groups, channels, eps=cfg.norm_eps, affine=True, dtype=self.dtype, device=self.device
        )

    def linear(self, cin, cout):
        return self.ops.Linear(cin, cout, bias=True, dtype=self.dtype, device=self.device)


def _identity(t: torch.Tensor) -> tuple:
    """Storage and version of ``t``: changes when the tensor is replaced or written in place. Inference tensors
    (weights loaded under ``torch.inference_mode``, as inside a ComfyUI server) keep no version counter; they are
    named by storage alone (they can only be written in place inside inference mode, which no loader does)."""
    return (t.data_ptr(), None if t.is_inference() else t._version)


class ResidualBlock3D(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1x1 when widths differ) shortcut."""

    def __init__(self, ctx: _Ctx, cin: int, cout: int, per_frame_norm: bool):
        super().__init__()
        self.per_frame_norm = per_frame_norm
        self.norm1 = ctx.norm(cin)
        self.conv1 = ctx.conv(cin, cout)
        self.norm2 = ctx.norm(cout)
        self.conv2 = ctx.conv(cout, cout)
        self.shortcut = ctx.pointwise(cin, cout) if cin != cout else None
        self._zero_branch: tuple[tuple, bool] = ((), False)  # (conv2 weight identity, whether it is all zeros)

    def branch_is_zero(self) -> bool:
        """Whether conv2 is all zeros, so the residual branch adds exactly nothing (a VAE built by construction,
        such as the micro model's, switches blocks off this way). Checked once per weight tensor and version."""
        w, b = self.conv2.weight, self.conv2.bias
        if not (w.dtype.is_floating_point and w.dtype.itemsize >= 2) or w.device.type == "meta":
            return False  # fp8 storage (cast on the fly) or no data: never skip
        key = (_identity(w), None if b is None else _identity(b))
        if self._zero_branch[0] != key:
            self._zero_branch = (key, not bool(w.any()) and (b is None or not bool(b.any())))
        return self._zero_branch[1]

    def forward(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:  # [B,Cin,T,H,W] -> [B,Cout,T,H,W]
        shortcut = x if self.shortcut is None else self.shortcut(x)
        if not torch.is_grad_enabled() and self.branch_is_zero():
            return shortcut if self.shortcut is not None else shortcut.clone()  # the caller may write into it
        h = F.silu(_group_norm(self.norm1, x, self.per_frame_norm), inplace=True)
        h = self.conv1(h, mode)
        h = F.silu(_group_norm(self.norm2, h, self.per_frame_norm), inplace=True)
        h = self.conv2(h, mode)
        return h.add_(shortcut)  # output_scale_factor is 1 in every released VAE


class MidAttention(nn.Module):
    """Single-head self-attention with a GroupNorm'd input and a residual (per frame, or over the chunk)."""

    def __init__(self, ctx: _Ctx, channels: int, kind: str):
        super().__init__()
        self.kind = kind  # "spatial": tokens are one frame's h*w; "3d": all t*h*w of the chunk
        self.group_norm = ctx.norm(channels)
        self.to_q = ctx.linear(channels, channels)
        self.to_k = ctx.linear(channels, channels)
        self.to_v = ctx.linear(channels, channels)
        self.to_out = ctx.linear(channels, channels)

    def forward(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.kind == "spatial":
            seq = x.transpose(1, 2).reshape(b * t, c, h * w)  # [B*T, C, HW]
        else:
            seq = x.reshape(b, c, t * h * w)  # [B, C, THW]
        tokens = self.group_norm(seq).transpose(1, 2)  # [N, L, C]
        q = self.to_q(tokens).unsqueeze(1)  # [N, 1 head, L, C]
        k = self.to_k(tokens).unsqueeze(1)
        v = self.to_v(tokens).unsqueeze(1)
        out = self.to_out(attention(q, k, v).squeeze(1))  # [N, L, C]
        out = out.transpose(1, 2) + seq  # [N, C, L]
        if self.kind == "spatial":
            return out.reshape(b, t, c, h, w).transpose(1, 2)
        return out.reshape(b, c, t, h, w)


class MidBlock3D(nn.Module):
    """``layers`` resnets at the bottleneck width, with an optional attention between consecutive ones."""

    def __init__(self, ctx: _Ctx, channels: int, layers: int, attention_kind: str | None, per_frame_norm: bool):
        super().__init__()
        self.convs = nn.ModuleList(ResidualBlock3D(ctx, channels, channels, per_frame_norm) for _ in range(layers))
        self.attentions = nn.ModuleList(
            MidAttention(ctx, channels, attention_kind) for _ in range(layers - 1 if attention_kind else 0)
        )

    def forward(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:
        x = self.convs[0](x, mode)
        for i, resnet in enumerate(self.convs[1:]):
            if self.attentions:
                x = self.attentions[i](x, mode)
            x = resnet(x, mode)
        return x


class Downsampler3D(nn.Module):
    """Zero-pad right/bottom by one pixel, then a stride-(t,2,2) conv without spatial padding."""

    def __init__(self, ctx: _Ctx, channels: int, time_stride: int):
        super().__init__()
        self.conv = ctx.conv(channels, channels, stride=(time_stride, 2, 2), spatial_padding=0)

    def forward(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:  # [B,C,T,H,W] -> [B,C,T/s,H/2,W/2]
        return self.conv(F.pad(x, (0, 1, 0, 1)), mode)


class Upsampler3D(nn.Module):
    """Nearest 2x spatial upsample, conv, then (spatio-temporal blocks) 2x in time when the mode asks."""

    def __init__(self, ctx: _Ctx, channels: int, temporal: bool, time_interpolation: str):
        super().__init__()
        self.temporal = temporal
        self.time_interpolation = time_interpolation  # "nearest" with per-frame norm, else "trilinear"
        self.conv = ctx.conv(channels, channels)

    def spatial(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:  # [B,C,T,H,W] -> [B,C,T,2H,2W]
        # Pad/cache in time BEFORE the nearest upsample: the same tensor as upsampling first (nearest
        # works frame by frame), but the conv's cache is kept at a quarter of the size.
        return self.conv.conv_padded(F.interpolate(self.conv.pad_time(x, mode), scale_factor=(1, 2, 2)))

    def doubles_time(self, mode: ChunkMode) -> bool:
        """Whether this chunk is upsampled 2x in time (every chunk but a lone first one)."""
        return self.temporal and mode.upsample_time

    def double_time(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:  # [B,C,T,..] -> [B,C,2T,..]
        if not self.doubles_time(mode):
            return x
        if mode.standalone:  # [B,C,T,..] -> [B,C,2T-1,..]: the chunk's first frame stays single
            if x.shape[2] == 1:
                return x
            rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 1, 1), mode=self.time_interpolation)
            return torch.cat([x[:, :, :1], rest], dim=2)
        return F.interpolate(x, scale_factor=(2, 1, 1), mode=self.time_interpolation)

    def forward(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:
        return self.double_time(self.spatial(x, mode), mode)


class DownBlock3D(nn.Module):
    """Resnets, then an optional downsampler (stride 1 or 2 in time)."""

    def __init__(self, ctx, cin, cout, layers, time_stride: int | None, per_frame_norm: bool):
        super().__init__()
        self.convs = nn.ModuleList(
            ResidualBlock3D(ctx, cin if i == 0 else cout, cout, per_frame_norm) for i in range(layers)
        )
        self.downsampler = Downsampler3D(ctx, cout, time_stride) if time_stride else None

    def forward(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:
        for resnet in self.convs:
            x = resnet(x, mode)
        return x if self.downsampler is None else self.downsampler(x, mode)


class UpBlock3D(nn.Module):
    """Resnets, then an optional upsampler at the block's output width."""

    def __init__(self, ctx, cin, cout, layers, upsample: str | None, per_frame_norm: bool):
        super().__init__()
        self.convs = nn.ModuleList(
            ResidualBlock3D(ctx, cin if i == 0 else cout, cout, per_frame_norm) for i in range(layers)
        )
        interp = "nearest" if per_frame_norm else "trilinear"
        self.upsampler = Upsampler3D(ctx, cout, upsample == "spatiotemporal", interp) if upsample else None

    def body(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:
        """Everything but the temporal doubling."""
        for resnet in self.convs:
            x = resnet(x, mode)
        return x if self.upsampler is None else self.upsampler.spatial(x, mode)

    def forward(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:
        x = self.body(x, mode)
        return x if self.upsampler is None else self.upsampler.double_time(x, mode)


class Encoder(nn.Module):
    """Video [B,3,T,H,W] -> 2*latent_channels moments at 1/8 size (before quant_conv)."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        cfg = ctx.cfg
        chans, sgn = cfg.block_out_channels, cfg.spatial_group_norm
        self.per_frame_norm = sgn
        self.conv_in = ctx.conv(cfg.in_channels, chans[0])
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            if kind not in (SPATIAL_DOWN, SPATIOTEMPORAL_DOWN):
                raise ValueError(f"unknown down block type {kind!r}")
            time_stride = None if i == len(chans) - 1 else (2 if kind == SPATIOTEMPORAL_DOWN else 1)
            cin = chans[max(i - 1, 0)]
            self.down_blocks.append(DownBlock3D(ctx, cin, chans[i], cfg.layers_per_block, time_stride, sgn))
        self.mid_block = MidBlock3D(ctx, chans[-1], cfg.layers_per_block, cfg.mid_block_attention, sgn)
        self.conv_norm_out = ctx.norm(chans[-1])
        self.conv_out = ctx.conv(chans[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:
        x = self.conv_in(x, mode)
        for block in self.down_blocks:
            x = block(x, mode)
        x = self.mid_block(x, mode)
        x = F.silu(_group_norm(self.conv_norm_out, x, self.per_frame_norm), inplace=True)
        return self.conv_out(x, mode)


class Decoder(nn.Module):
    """Latents [B,L,T,h,w] (after post_quant_conv) -> video [B,3,T',8h,8w], as a list of stages."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        cfg = ctx.cfg
        rev, sgn = tuple(reversed(cfg.block_out_channels)), cfg.spatial_group_norm
        self.per_frame_norm = sgn
        self.conv_in = ctx.conv(cfg.latent_channels, rev[0])
        self.mid_block = MidBlock3D(ctx, rev[0], cfg.layers_per_block, cfg.mid_block_attention, sgn)
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            if kind not in (SPATIAL_UP, SPATIOTEMPORAL_UP):
                raise ValueError(f"unknown up block type {kind!r}")
            upsample = None if i == len(rev) - 1 else ("spatiotemporal" if kind == SPATIOTEMPORAL_UP else "spatial")
            cin = rev[max(i - 1, 0)]
            self.up_blocks.append(UpBlock3D(ctx, cin, rev[i], cfg.layers_per_block + 1, upsample, sgn))
        self.conv_norm_out = ctx.norm(rev[-1])
        self.conv_out = ctx.conv(rev[-1], cfg.out_channels)

    def _head(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:
        x = F.silu(_group_norm(self.conv_norm_out, x, self.per_frame_norm), inplace=True)
        return self.conv_out(x, mode)

    def stages(self) -> list[Callable[[torch.Tensor, ChunkMode], torch.Tensor]]:
        """The decoder as consecutive steps, so a caller can split the frames between any two.

        Temporal doubling is a step of its own (an ``Upsampler3D.double_time`` bound method), so a
        frame-by-frame caller can run the rest twice on one frame instead of materialising two copies.
        """
        steps: list = [self.conv_in, self.mid_block]
        for block in self.up_blocks:
            steps.append(block.body)
            if block.upsampler is not None and block.upsampler.temporal:
                steps.append(block.upsampler.double_time)
        return [*steps, self._head]

    def forward(self, x: torch.Tensor, mode: ChunkMode) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x, mode)
        return x


# --------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------


def nearest_multiples(value: int, step: int, offset: int = 0) -> str:
    """'a or b': the valid values ``offset + k*step`` nearest ``value`` (just ``a`` when valid)."""
    lo = max(offset + ((value - offset) // step) * step, offset if offset > 0 else step)
    return str(lo) if lo == value else f"{lo} or {lo + step}"


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``length``; the last tile is aligned to the end instead of shrinking."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(size: int, overlap_before: int, overlap_after: int, device) -> torch.Tensor:
    """1-D blend weight of a tile: linear ramps over the overlaps with its neighbours, 1 elsewhere."""
    w = torch.ones(size, device=device, dtype=torch.float32)
    if overlap_before > 0:
        w[:overlap_before] = (torch.arange(overlap_before, device=device) + 0.5) / overlap_before
    if overlap_after > 0:
        w[size - overlap_after :] = torch.minimum(
            w[size - overlap_after :], (torch.arange(overlap_after, 0, -1, device=device) - 0.5) / overlap_after
        )
    return w


@dataclass
class _Tile:
    """One spatial tile: latent window, pixel window and the 2-D blend weight of its pixels."""

    lat: tuple[slice, slice]
    pix: tuple[slice, slice]
    weight: torch.Tensor | None = field(default=None)  # [H_tile, W_tile] or None when untiled


def check_tiling(tile: int | None, overlap: int | None) -> None:
    """Tile side >= 1 latent and 0 <= overlap < tile (ValueError otherwise)."""
    if tile is None:
        return
    if tile < 1:
        raise ValueError(f"tile_latent_size must be >= 1, got {tile}")
    if overlap is not None and not 0 <= overlap < tile:
        raise ValueError(f"tile_overlap must be in [0, tile_latent_size={tile}), got {overlap}")


def spatial_tiles(h: int, w: int, scale: int, tile: int | None, overlap: int | None, device) -> list[_Tile]:
    """Overlapping latent tiles of side ``tile`` (``None``: one tile), with pixel blend weights."""
    if tile is None or (h <= tile and w <= tile):
        return [_Tile((slice(0, h), slice(0, w)), (slice(0, h * scale), slice(0, w * scale)))]
    overlap = tile // 4 if overlap is None else overlap
    out = []
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    for iy, y0 in enumerate(ys):
        th = min(tile, h)
        for ix, x0 in enumerate(xs):
            tw = min(tile, w)
            # Overlap with the previous / next tile, in pixels (the last tile may overlap more).
            before_y = (ys[iy - 1] + th - y0) * scale if iy > 0 else 0
            after_y = (y0 + th - ys[iy + 1]) * scale if iy + 1 < len(ys) else 0
            before_x = (xs[ix - 1] + tw - x0) * scale if ix > 0 else 0
            after_x = (x0 + tw - xs[ix + 1]) * scale if ix + 1 < len(xs) else 0
            wy = _ramp(th * scale, before_y, after_y, device)
            wx = _ramp(tw * scale, before_x, after_x, device)
            out.append(
                _Tile(
                    (slice(y0, y0 + th), slice(x0, x0 + tw)),
                    (slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale)),
                    wy[:, None] * wx[None, :],
                )
            )
    return out


class MagvitVAE(nn.Module):
    """EasyAnimate's causal video VAE; state-dict names equal the official and diffusers ones."""

    def __init__(
        self,
        config: VAEConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations=None,
        **overrides,
    ):
        super().__init__()
        cfg = replace(config or VAE_V51, **overrides)
        self.config = cfg
        ctx = _Ctx(operations or default_operations, dtype, device, cfg)
        self.encoder = Encoder(ctx)
        self.decoder = Decoder(ctx)
        self.quant_conv = ctx.pointwise(2 * cfg.latent_channels, 2 * cfg.latent_channels)
        self.post_quant_conv = ctx.pointwise(cfg.latent_channels, cfg.latent_channels)
        # The dtype encode/decode compute in (inputs are cast to it). Storage dtypes such as fp8 need a
        # ComfyUI operations namespace that casts weights on the fly; set this to the compute dtype then.
        self.compute_dtype = dtype if dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2 else None

    # ---- helpers ---------------------------------------------------------------------------------

    # Out of memory, decode drops the chunk to one latent together with the first tiling: with per-frame decoding
    # the chunk hardly changes the peak (V1's image VAE, whose peak grows with it, halves it first instead).
    decode_shrinks_chunk_first = False

    @property
    def frame_local(self) -> bool:
        """Whether every decoder op depends on its own frame plus cached past frames only.

        True for the mag VAE with per-frame GroupNorm and no "3d" attention: then chunk sizes are a
        pure memory knob and the decoder may run frame by frame with identical numbers.
        """
        cfg = self.config
        return cfg.temporal_mode == "mag" and cfg.spatial_group_norm and cfg.mid_block_attention != "3d"

    def clear_caches(self) -> None:
        """Forget every conv's temporal cache (the start of a new video)."""
        for module in self.modules():
            if isinstance(module, CausalTime):
                module.cache = ()

    def _dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        stored = self.post_quant_conv.weight.dtype
        return stored if stored.itemsize >= 2 else torch.float32

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a valid pixel frame count."""
        return self.config.latent_frames(frames)

    def video_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames`` latents."""
        return self.config.video_frames(latent_frames)

    def check_video_shape(self, shape) -> None:
        """Raise ValueError naming the nearest valid values unless ``shape`` is a video [B, C, F, H, W] it encodes."""
        cfg = self.config
        if len(shape) != 5:
            raise ValueError(f"video must be [B, C, F, H, W] (5 dims), got {len(shape)} dims {tuple(shape)}")
        b, c, f, h, w = shape
        if c != cfg.in_channels:
            raise ValueError(f"video has {c} channels, expected {cfg.in_channels} (RGB in [-1, 1])")
        cfg.check_video_size(f, h, w)

    def _check_video(self, video: torch.Tensor, chunk_frames: int | None, tile: int | None, overlap: int | None) -> int:
        self.check_video_shape(video.shape)
        cfg = self.config
        check_tiling(tile, overlap)
        return self.chunk_length(chunk_frames, cfg.mini_batch_encoder, "chunk_frames", cfg.temporal_compression)

    def chunk_length(self, chunk: int | None, released: int, name: str, multiple: int) -> int:
        """Validated chunk size: free (a multiple of ``multiple``) when frame-local, else the released one."""
        if chunk is None:
            return released
        if chunk < 1 or chunk % multiple != 0:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {chunk}")
        if chunk != released and not self.frame_local:
            raise ValueError(
                f"{name}={chunk}: this VAE's GroupNorm/attention statistics span a chunk, so its chunk size "
                f"is part of the model and must be {released}"
            )
        return chunk

    # ---- encode ----------------------------------------------------------------------------------

    def encode_plan(self, frames: int, chunk: int) -> Iterator[tuple[int, int, ChunkMode]]:
        """(first frame, end frame, mode) of each encoder call."""
        cfg = self.config
        if cfg.temporal_mode == "mag":
            yield 0, 1, MAG_FIRST
            start = 1
            mode = CAUSAL_NEXT
        elif cfg.temporal_mode == "v2-magvit":  # the V2 pipeline's loop: independent calls of `chunk` frames
            start = 0
            mode = STANDALONE
        else:
            start = frames % 2  # an odd count (slice: only 1 passes validation) starts with frame 0 alone
            if start:
                yield 0, 1, SAME_SINGLE
            mode = SAME_CHUNK
        for s in range(start, frames, chunk):
            yield s, min(s + chunk, frames), mode

    @torch.no_grad()
    def encode(
        self,
        video: torch.Tensor,
        *,
        chunk_frames: int | None = None,
        tile_latent_size: int | None = None,
        tile_overlap: int | None = None,
        progress: ProgressFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Video [B,3,F,H,W] in [-1,1] -> posterior (mean, logvar), each [B,L,T,H/8,W/8] float32.

        Multiply ``mean`` by ``config.scaling_factor`` to get DiT latents. ``chunk_frames`` (mag VAE
        with per-frame norm only; a multiple of 4) sets how many frames after frame 0 go through the
        encoder at once; ``tile_latent_size``/``tile_overlap`` (latent pixels) enable spatial tiling
        with linear blending of the moments.
        """
        chunk = self._check_video(video, chunk_frames, tile_latent_size, tile_overlap)
        plan = list(self.encode_plan(video.shape[2], chunk))
        tiles = self._latent_tiles(video, tile_latent_size, tile_overlap)
        total, done = len(tiles) * len(plan), 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        moments = self._encode_moments(video, self.latent_frames(video.shape[2]), plan, tiles, tick)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def _latent_tiles(self, video: torch.Tensor, tile: int | None, overlap: int | None) -> list[_Tile]:
        s = self.config.spatial_compression
        return spatial_tiles(video.shape[3] // s, video.shape[4] // s, 1, tile, overlap, video.device)

    def _encode_moments(
        self, video: torch.Tensor, frames: int, plan: list, tiles: list[_Tile], tick: Callable[[], None]
    ) -> torch.Tensor:
        """The quant_conv moments [B,2L,frames,h,w] (float32) of ``video`` encoded along ``plan``, tile by tile."""
        cfg = self.config
        b, _, _, h, w = video.shape
        s = cfg.spatial_compression
        lh, lw = h // s, w // s
        moments = torch.zeros(b, 2 * cfg.latent_channels, frames, lh, lw, device=video.device)
        dtype = self._dtype()
        self.clear_caches()
        try:
            weight_sum = torch.zeros(lh, lw, device=video.device) if len(tiles) > 1 else None
            for tile in tiles:
                ys, xs = tile.lat
                pys, pxs = slice(ys.start * s, ys.stop * s), slice(xs.start * s, xs.stop * s)
                t0 = 0
                for start, end, mode in plan:
                    x = video[:, :, start:end, pys, pxs].to(dtype)
                    m = self.quant_conv(self.encoder(x, mode)).float()  # [B, 2L, t, th, tw]
                    t1 = t0 + m.shape[2]
                    if tile.weight is None:
                        moments[:, :, t0:t1] = m
                    else:
                        moments[:, :, t0:t1, ys, xs] += m * tile.weight
                    t0 = t1
                    del x, m
                    tick()
                if weight_sum is not None:
                    weight_sum[ys, xs] += tile.weight
                self.clear_caches()
            if weight_sum is not None:
                moments /= weight_sum
        finally:
            self.clear_caches()
        return moments

    # ---- decode ----------------------------------------------------------------------------------

    def decode_plan(self, latents: int, chunk: int) -> Iterator[tuple[int, int, ChunkMode]]:
        """(first latent, end latent, mode) of each decoder call."""
        temporal_mode = self.config.temporal_mode
        if temporal_mode == "mag":
            yield 0, 1, MAG_FIRST
            start = 1
        elif temporal_mode == "v2-magvit":  # the V2 pipeline's loop: independent calls of `chunk` latents
            for s in range(0, latents, chunk):
                yield s, min(s + chunk, latents), STANDALONE
            return
        elif temporal_mode == "v3-slice":
            start = latents % 2  # an odd count decodes latent 0 alone first
            if start:
                yield 0, 1, SAME_SINGLE
            for s in range(start, latents, chunk):
                yield s, min(s + chunk, latents), SAME_CHUNK
            return
        elif latents == 1:
            yield 0, 1, SAME_SINGLE
            return
        else:
            start = 0  # first pair: causal with empty caches (replicate padding), later pairs cached
        for s in range(start, latents, chunk):
            yield s, min(s + chunk, latents), CAUSAL_NEXT

    def decoder_context(self, start: int, end: int, latents: int, mode: ChunkMode) -> tuple[int, int]:
        """Latents ``conv_in`` and the mid block see for the chunk [start, end): the chunk itself, or (V3's
        "features share") also the previous and the next chunk of pairs, whose outputs are then dropped."""
        if self.config.temporal_mode != "v3-slice" or mode != SAME_CHUNK:
            return start, end
        m = self.config.mini_batch_decoder
        lo = start - m if start - m >= latents % 2 else start  # no previous chunk before the first pair
        hi = min(start + 2 * m, latents) if start + m < latents else end
        return lo, hi

    def _run_decoder(
        self, x: torch.Tensor, mode: ChunkMode, emit: Callable[[torch.Tensor], None], frame_by_frame: bool, first=0
    ) -> None:
        """Decoder stages from ``first`` on, handing the result to ``emit``.

        With ``frame_by_frame`` every multi-frame tensor between stages is split into single frames run
        one after another (the conv caches carry the past, so the numbers do not change), and a nearest
        temporal doubling runs the remaining stages twice on the same frame instead of copying it: the
        peak is then one high-resolution frame, not a chunk.
        """
        stages = self.decoder.stages()
        for i in range(first, len(stages)):
            stage = stages[i]
            if frame_by_frame:
                if x.shape[2] > 1:
                    for t in range(x.shape[2]):
                        self._run_decoder(x[:, :, t : t + 1], mode, emit, frame_by_frame, i)
                    return
                upsampler = getattr(stage, "__self__", None)
                if isinstance(upsampler, Upsampler3D) and upsampler.doubles_time(mode):
                    for _ in range(2):
                        self._run_decoder(x, mode, emit, frame_by_frame, i + 1)
                    return
            x = stage(x, mode)
        emit(x)

    @property
    def smooths_output(self) -> bool:
        """Whether ``decode`` ends with the official pipelines' clamp + ``smooth_output`` (V2, V3)."""
        return self.config.temporal_mode in ("v2-magvit", "v3-slice")

    def smoothed_frames(self, frames: int) -> tuple[int, int] | None:
        """[first, end) of the frames ``smooth_output`` re-encodes in a decoded video, or None when it is
        too short to be smoothed (at most one encoder chunk)."""
        m = self.config.mini_batch_encoder
        return None if frames <= m else (m // 2, frames - (m - m // 2))

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        *,
        chunk_latents: int | None = None,
        tile_latent_size: int | None = None,
        tile_overlap: int | None = None,
        frame_by_frame: bool | None = None,
        out: torch.Tensor | None = None,
        progress: ProgressFn | None = None,
        smooth: bool = True,
        smooth_generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Latents [B,L,T,h,w], ALREADY divided by ``config.scaling_factor`` -> video [B,3,F,8h,8w].

        The output is written into ``out`` (preallocated, any float dtype) or a new float32 tensor on the
        latents' device; F = ``config.video_frames(T)``: 4(T-1)+1 (mag), 4T (slice, V3; T even), 3T (V2; T = 3k).
        V4 / V5 / V5.1: unclamped (roughly [-1, 1]). V2 / V3: what the official ``decode_latents`` makes before
        its [0, 1] mapping -- clamped to [-1, 1], then (``smooth``) ``smooth_output``'s re-encoded middle averaged
        in and clamped again. The official re-encode draws a posterior sample from the global RNG; here it
        takes the posterior mean unless ``smooth_generator`` is given, which then supplies that noise.
        ``chunk_latents``: latents per decoder call after latent 0 (mag with per-frame norm: any value
        >= 1, identical output; otherwise fixed by the model). ``frame_by_frame`` (default: whenever it
        is exact) runs the high-resolution stages one frame at a time. ``tile_latent_size`` and
        ``tile_overlap`` (latent pixels, default a quarter tile) decode overlapping spatial tiles and
        blend them linearly. ``progress(done, total)`` is called after every chunk; raising from it
        interrupts the decode cleanly.
        """
        cfg = self.config
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B, C, T, h, w] (5 dims), got {latents.ndim} dims")
        b, c, t, lh, lw = latents.shape
        if c != cfg.latent_channels:
            raise ValueError(f"latents have {c} channels, expected latent_channels={cfg.latent_channels}")
        if t < 1 or lh < 1 or lw < 1:
            raise ValueError(f"latents must have at least one frame and pixel, got {tuple(latents.shape)}")
        check_tiling(tile_latent_size, tile_overlap)
        chunk = self.chunk_length(chunk_latents, cfg.mini_batch_decoder, "chunk_latents", 1)
        if frame_by_frame is None:
            frame_by_frame = self.frame_local
        elif frame_by_frame and not self.frame_local:
            raise ValueError("frame_by_frame needs the mag VAE with spatial_group_norm and no '3d' attention")
        s = cfg.spatial_compression
        shape = (b, cfg.out_channels, self.video_frames(t), lh * s, lw * s)
        if out is None:
            out = torch.empty(shape, device=latents.device, dtype=torch.float32)
        elif tuple(out.shape) != shape or not out.dtype.is_floating_point:
            raise ValueError(f"out must be a float tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
        middle = self.smoothed_frames(shape[2]) if self.smooths_output and smooth else None
        plan = list(self.decode_plan(t, chunk))
        tiles = spatial_tiles(lh, lw, s, tile_latent_size, tile_overlap, out.device)
        steps = len(plan)
        if middle is not None:
            mid_frames = middle[1] - middle[0]
            encode_plan = list(self.encode_plan(mid_frames, cfg.mini_batch_encoder))
            mid_latents = sum(cfg.chunk_latents(end - start) for start, end, _ in encode_plan)
            if self.video_frames(mid_latents) != mid_frames:
                nearest = max(cfg.latent_frames(cfg.nearest_frames(shape[2])[0]), 1)
                raise ValueError(
                    f"latents: {t} latent frames decode to {shape[2]} frames, whose middle {mid_frames} frames "
                    f"smooth_output cannot re-encode to the same length (the official pipeline fails there too); "
                    f"use {cfg.latent_frames(1)} or {nearest} latent frames (videos of "
                    f"{cfg.nearest_frames(shape[2])[1]} frames), or smooth=False"
                )
            decode_plan = list(self.decode_plan(mid_latents, chunk))
            steps += len(encode_plan) + len(decode_plan)
        total, done = len(tiles) * steps, 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        self._decode_into(latents, out, plan, tiles, frame_by_frame, tick)
        if not self.smooths_output:
            return out
        out.clamp_(-1.0, 1.0)
        if middle is None:
            return out
        # smooth_output: encode the middle (the official chunked loop), decode it, average it in.
        span = out[:, :, middle[0] : middle[1]]
        mid_tiles = self._latent_tiles(span, tile_latent_size, tile_overlap)
        moments = self._encode_moments(span, mid_latents, encode_plan, mid_tiles, tick)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean if smooth_generator is None else self._posterior_sample(mean, logvar, encode_plan, smooth_generator)
        redecoded = torch.empty_like(span)
        self._decode_into(z, redecoded, decode_plan, tiles, frame_by_frame, tick)
        span.add_(redecoded).div_(2)
        return out.clamp_(-1.0, 1.0)

    def _posterior_sample(
        self, mean: torch.Tensor, logvar: torch.Tensor, plan: list, generator: torch.Generator
    ) -> torch.Tensor:
        """mean + std * noise with one draw per official ``vae.encode`` call (V2: per chunk; V3: one call)."""
        if self.config.temporal_mode == "v2-magvit":
            sizes = [self.config.chunk_latents(end - start) for start, end, _ in plan]
        else:
            sizes = [mean.shape[2]]
        noise = torch.cat(
            [
                torch.randn(
                    (*mean.shape[:2], n, *mean.shape[3:]),
                    generator=generator,
                    device=generator.device,
                    dtype=mean.dtype,
                )
                for n in sizes
            ],
            dim=2,
        ).to(mean.device)
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise

    def _decode_into(
        self,
        latents: torch.Tensor,
        out: torch.Tensor,
        plan: list,
        tiles: list[_Tile],
        frame_by_frame: bool,
        tick: Callable[[], None],
    ) -> None:
        """Decode ``latents`` along ``plan``, tile by tile, writing (blending) the frames into ``out``."""
        t = latents.shape[2]
        dtype = self._dtype()
        weight_sum = None
        if len(tiles) > 1:
            out.zero_()
            weight_sum = torch.zeros(out.shape[3:], device=out.device)
        self.clear_caches()
        try:
            for tile in tiles:
                frame = 0

                def emit(frames: torch.Tensor, tile=tile) -> None:
                    nonlocal frame
                    n = frames.shape[2]
                    if tile.weight is None:
                        out[:, :, frame : frame + n] = frames
                    else:
                        out[:, :, frame : frame + n, tile.pix[0], tile.pix[1]] += frames.float() * tile.weight
                    frame += n

                for start, end, mode in plan:
                    lo, hi = self.decoder_context(start, end, t, mode)
                    z = self.post_quant_conv(latents[:, :, lo:hi, tile.lat[0], tile.lat[1]].to(dtype))
                    if (lo, hi) == (start, end):
                        self._run_decoder(z, mode, emit, frame_by_frame)
                    else:  # V3: conv_in and the mid block see the neighbours, the rest the chunk alone
                        h = self.decoder.mid_block(self.decoder.conv_in(z, mode), mode)
                        self._run_decoder(h[:, :, start - lo : end - lo], mode, emit, frame_by_frame, first=2)
                        del h
                    del z
                    tick()
                if weight_sum is not None:
                    weight_sum[tile.pix[0], tile.pix[1]] += tile.weight
                self.clear_caches()
            if weight_sum is not None:
                out /= weight_sum.to(out.dtype)
        finally:
            self.clear_caches()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``video`` through the posterior mean (a convenience for checks)."""
        mean, _ = self.encode(video)
        return self.decode(mean)


# --------------------------------------------------------------------------------------------------
# Memory planning and out-of-memory retry (pure torch; the ComfyUI nodes call these)
# --------------------------------------------------------------------------------------------------

# Working memory of decode / encode in elements of the compute dtype, for the released geometry
# (block_out_channels starting at 128; scaled linearly for narrower VAEs), output tensor excluded.
# Measured on CPU in float32 by bench/bench_vae_memory.py (RSS high-water mark above the loaded weights):
# * decode, frame by frame: 337k-415k elements per latent pixel of a tile (64-192 px frames; the
#   conv caches plus one high-resolution frame), the same for 2 or 4 latents and chunks of 1 or 3:
#   the length and the chunk do not change the peak. We count 400k (-2%..+21% of the measurements)
#   plus, per latent of a chunk, the chunk-wide low-resolution stages (conv_in and the 512-channel mid
#   block, a few thousand elements: below the measurement's noise, bounded from the layer widths).
# * encode (chunks of frames through every stage): 4000 per pixel of a tile (conv caches) plus 400 per
#   pixel and frame of a chunk; -9%..+22% of the measurements at 64-128 px, chunks of 4 and 8.
DECODE_PER_LATENT_PIXEL = 400_000
DECODE_PER_CHUNK_LATENT_PIXEL = 8_192
ENCODE_PER_PIXEL = 4_000
ENCODE_PER_CHUNK_PIXEL = 400
# Smallest spatial tile the out-of-memory retry goes down to (latent pixels; 64 image pixels).
MIN_TILE_LATENTS = 8


def width_scale(config: VAEConfig) -> float:
    """Activation memory of ``config`` relative to the released width (first block 128 channels)."""
    return config.block_out_channels[0] / 128


def tile_area(h: int, w: int, tile: int | None) -> int:
    """Latent pixels of one tile of side ``tile`` (``None``: the whole h x w grid) on an h x w grid."""
    return (min(tile, h) * min(tile, w)) if tile else h * w


def decode_memory(
    config: VAEConfig, latent_shape, dtype: torch.dtype, chunk_latents: int | None = None, tile: int | None = None
) -> int:
    """Bytes of working memory ``MagvitVAE.decode`` needs for latents of ``latent_shape`` (output excluded)."""
    b, _, t, h, w = latent_shape
    chunk = min(chunk_latents or config.mini_batch_decoder, max(t - 1, 1))
    frame_local = config.temporal_mode == "mag" and config.spatial_group_norm and config.mid_block_attention != "3d"
    # Without frame-by-frame decoding every stage holds the chunk's frames at once.
    frames = 1 if frame_local else chunk * config.temporal_compression
    per_pixel = DECODE_PER_LATENT_PIXEL * frames + DECODE_PER_CHUNK_LATENT_PIXEL * chunk
    return int(b * tile_area(h, w, tile) * per_pixel * width_scale(config) * dtype.itemsize)


def encode_memory(
    config: VAEConfig, video_shape, dtype: torch.dtype, chunk_frames: int | None = None, tile: int | None = None
) -> int:
    """Bytes of working memory ``MagvitVAE.encode`` needs for a video of ``video_shape`` (output excluded)."""
    b, _, f, h, w = video_shape
    s = config.spatial_compression
    chunk = min(chunk_frames or config.mini_batch_encoder, max(f - 1, 1))
    pixels = tile_area(h // s, w // s, tile) * s * s
    per_pixel = ENCODE_PER_PIXEL + ENCODE_PER_CHUNK_PIXEL * chunk
    return int(b * pixels * per_pixel * width_scale(config) * dtype.itemsize)


@dataclass(frozen=True)
class ChunkTile:
    """Temporal chunk and spatial tile settings of one decode / encode (``None``: the default)."""

    chunk: int | None = None  # decode: latents per chunk; encode: frames per chunk
    tile: int | None = None  # tile side in latent pixels; None: untiled
    overlap: int | None = None  # tile overlap in latent pixels; None: a quarter tile


# Largest automatic decode chunk: the length does not change the peak (frame-by-frame decoding), so a
# bound keeps a progress update and an interrupt check every 8 latents (29 frames).
MAX_AUTO_DECODE_CHUNK = 8


def largest_tile(h: int, w: int, per_latent_pixel_bytes: float, budget: float, min_tile: int) -> int | None:
    """Largest square tile (latent pixels) whose working memory fits ``budget``; None when no tiling is needed."""
    if h * w * per_latent_pixel_bytes <= budget:
        return None
    side = int((max(budget, 0) / per_latent_pixel_bytes) ** 0.5)
    return max(min_tile, min(side, max(h, w) - 1))


def plan_decode(
    vae: MagvitVAE,
    latent_shape,
    dtype: torch.dtype,
    budget_bytes: float,
    requested: ChunkTile = ChunkTile(),
    min_tile: int = MIN_TILE_LATENTS,
) -> ChunkTile:
    """Fill the ``None`` fields of ``requested`` with the largest chunk / tile whose memory fits ``budget_bytes``."""
    cfg = vae.config
    b, _, t, h, w = latent_shape
    chunk = requested.chunk
    if chunk is None and vae.frame_local:
        fits = [
            c
            for c in range(1, min(MAX_AUTO_DECODE_CHUNK, max(t - 1, 1)) + 1)
            if decode_memory(cfg, latent_shape, dtype, c, requested.tile) <= budget_bytes
        ]
        chunk = fits[-1] if fits else 1
    tile = requested.tile
    if tile is None:
        per_pixel = decode_memory(cfg, (b, 0, t, 1, 1), dtype, chunk)
        tile = largest_tile(h, w, per_pixel, budget_bytes, min_tile)
    return ChunkTile(chunk, tile, requested.overlap)


def plan_encode(
    vae: MagvitVAE,
    video_shape,
    dtype: torch.dtype,
    budget_bytes: float,
    requested: ChunkTile = ChunkTile(),
    min_tile: int = MIN_TILE_LATENTS,
) -> ChunkTile:
    """Fill the ``None`` fields of ``requested``: the largest frame chunk, then the largest tile that fit."""
    cfg = vae.config
    b, _, f, h, w = video_shape
    tc = cfg.temporal_compression
    chunk = requested.chunk
    if chunk is None and vae.frame_local:
        candidates = range(tc, max(f - 1, tc) + 1, tc)
        fits = [c for c in candidates if encode_memory(cfg, video_shape, dtype, c, requested.tile) <= budget_bytes]
        chunk = fits[-1] if fits else tc
    tile = requested.tile
    if tile is None:
        s = cfg.spatial_compression
        per_pixel = encode_memory(cfg, (b, 0, f, s, s), dtype, chunk)
        tile = largest_tile(h // s, w // s, per_pixel, budget_bytes, min_tile)
    return ChunkTile(chunk, tile, requested.overlap)


def smaller_settings(
    vae: MagvitVAE,
    latent_hw: tuple[int, int],
    current: ChunkTile,
    min_chunk: int,
    chunk_first: bool,
    min_tile: int = MIN_TILE_LATENTS,
) -> ChunkTile | None:
    """The next, smaller settings to try after running out of memory; None when nothing is left to shrink.

    ``chunk_first`` (encode, whose peak grows with the chunk): halve the chunk down to ``min_chunk``
    before tiling. Otherwise (decode, whose peak the chunk hardly changes) the chunk drops to
    ``min_chunk`` together with the first tiling. The tile side is halved each time (an untiled run
    starts at half the larger latent side) down to ``min_tile``.
    """
    chunk = current.chunk
    if vae.frame_local and chunk is not None and chunk > min_chunk:
        if chunk_first:
            return replace(current, chunk=max(min_chunk, chunk // 2 // min_chunk * min_chunk))
        chunk = min_chunk
    side = max(latent_hw)
    tile = (side + 1) // 2 if current.tile is None or current.tile >= side else current.tile // 2
    if tile < max(min_tile, 1):
        return None
    overlap = None if current.overlap is None else min(current.overlap, tile // 4)
    return ChunkTile(chunk, tile, overlap)


def retry_on_oom(
    run: Callable[[ChunkTile], torch.Tensor],
    first: ChunkTile,
    shrink: Callable[[ChunkTile], ChunkTile | None],
    oom_errors: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,),
    on_retry: Callable[[ChunkTile, str], None] | None = None,
) -> torch.Tensor:
    """``run(settings)``, retried with ``shrink(settings)`` after each out-of-memory error until it fits.

    The retry starts after the ``except`` block has ended: the failed attempt's tensors are referenced by
    the exception's traceback until then (ComfyUI's VAE fallback does the same). ``on_retry(next, error)``
    can log and empty the allocator's cache. When nothing is left to shrink the last error is raised.
    """
    settings = first
    while True:
        try:
            return run(settings)
        except oom_errors as e:
            smaller = shrink(settings)
            if smaller is None:
                raise
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
        settings = smaller
        if on_retry is not None:
            on_retry(settings, message)


def decode_with_retry(
    vae: MagvitVAE,
    latents: torch.Tensor,
    settings: ChunkTile = ChunkTile(),
    *,
    out: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
    oom_errors: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,),
    on_retry: Callable[[ChunkTile, str], None] | None = None,
    min_tile: int = MIN_TILE_LATENTS,
) -> torch.Tensor:
    """``vae.decode`` (a MagvitVAE or V1's ImageVAE) with ``settings``; out of memory, it retries with smaller
    chunks, then smaller tiles (``decode_shrinks_chunk_first``)."""

    def run(s: ChunkTile) -> torch.Tensor:
        return vae.decode(
            latents, chunk_latents=s.chunk, tile_latent_size=s.tile, tile_overlap=s.overlap, out=out, progress=progress
        )

    hw, chunk_first = tuple(latents.shape[3:]), vae.decode_shrinks_chunk_first
    shrink = lambda s: smaller_settings(vae, hw, s, 1, chunk_first, min_tile)  # noqa: E731
    return retry_on_oom(run, settings, shrink, oom_errors, on_retry)


def encode_with_retry(
    vae: MagvitVAE,
    video: torch.Tensor,
    settings: ChunkTile = ChunkTile(),
    *,
    progress: ProgressFn | None = None,
    oom_errors: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,),
    on_retry: Callable[[ChunkTile, str], None] | None = None,
    min_tile: int = MIN_TILE_LATENTS,
) -> torch.Tensor:
    """The posterior mean of ``vae.encode`` (a MagvitVAE or V1's ImageVAE) with ``settings``, retried with smaller
    chunks, then smaller tiles, after out-of-memory errors."""

    def run(s: ChunkTile) -> torch.Tensor:
        mean, _ = vae.encode(
            video, chunk_frames=s.chunk, tile_latent_size=s.tile, tile_overlap=s.overlap, progress=progress
        )
        return mean

    s = vae.config.spatial_compression
    hw = (video.shape[3] // s, video.shape[4] // s)
    tc = vae.config.temporal_compression
    return retry_on_oom(run, settings, lambda c: smaller_settings(vae, hw, c, tc, True, min_tile), oom_errors, on_retry)
