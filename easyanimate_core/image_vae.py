"""EasyAnimate V1's VAE: PixArt-alpha's image ``AutoencoderKL`` (the SD VAE), applied to a video frame by frame.

V1 (``config/easyanimate_video_motion_module_v1.yaml``: ``enable_magvit: false``) has no video VAE: the official
pipelines (``pipeline_easyanimate*.py``, the branches where ``vae.quant_conv.weight.ndim != 5``) fold the frames
into the batch, encode them all as images (``latent_dist.sample``) and decode the latents one image at a time. So
a latent frame is one pixel frame (temporal compression 1) and any frame count is valid. The V1-era pipeline
(ebe1a64) divides by a hard-coded 0.18215 before decoding, f9eeabe by ``vae.config.scaling_factor``: the same
number for the SD VAE.

The graph is diffusers' ``AutoencoderKL`` with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks and its
state-dict names (``encoder.down_blocks.{i}.resnets.{j}.conv1``, ``mid_block.attentions.0.to_q``, ...). Older
diffusers folders (the original sd-vae-ft-*) name the mid-block attention ``query/key/value/proj_attn``:
:func:`canonical_key` renames those, as diffusers does when it loads them.

The interface is :class:`easyanimate_core.vae.MagvitVAE`'s, so the pipeline drives either: ``encode`` returns the
raw posterior moments (the caller multiplies by ``config.scaling_factor``), ``decode`` expects latents already
divided by it. Every op works within one image (GroupNorm and attention never see another frame), so how many
frames go through one call is a memory knob that does not change the result.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .ops import default_operations
from .vae import (
    MIN_TILE_LATENTS,
    ChunkTile,
    check_tiling,
    largest_tile,
    nearest_multiples,
    spatial_tiles,
    tile_area,
    width_scale,
)

ProgressFn = Callable[[int, int], None]

# The only block kinds diffusers builds an image AutoencoderKL from.
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"

# Frames per encoder call when the caller gives none. The official pipeline encodes every frame in one call;
# the result is the same per image, and a bound keeps a long 512 px video from holding all activations at once.
DEFAULT_ENCODE_FRAMES = 8
# Latent frames per decoder call: one, as the official decode loop does.
DEFAULT_DECODE_LATENTS = 1


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageVAEConfig:
    """Every hyperparameter of the image VAE (defaults: the SD VAE PixArt-alpha ships)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    # diffusers' mid_block_add_attention: one single-head self-attention between the two mid-block resnets.
    mid_block_attention: bool = True
    # Pixel height/width must be a multiple of this: 8x VAE compression times the DiT's 2x2 patch.
    pixel_multiple: int = 16

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn {self.act_fn!r} is not supported (the SD VAE uses 'silu')")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {self.block_out_channels}: {bad} not divisible by norm_num_groups="
                f"{self.norm_num_groups}; set norm_num_groups (config.json) to a divisor of every width"
            )

    @property
    def temporal_mode(self) -> str:
        """ "image": every frame is encoded and decoded on its own."""
        return "image"

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along height and width (8 for the SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_compression(self) -> int:
        """Frames per latent frame: 1, there is no temporal compression."""
        return 1

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a ``frames``-frame video: one per frame."""
        return frames

    def video_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames`` latents: one per latent frame."""
        return latent_frames

    def nearest_frames(self, frames: int) -> tuple[int, str]:
        """(the nearest valid frame count, the rule it follows): any count >= 1."""
        return max(1, frames), "any number of frames"

    def check_video_size(self, frames: int, height: int, width: int) -> None:
        """Raise ValueError naming the nearest valid values unless this VAE encodes videos of this size."""
        if frames < 1:
            raise ValueError(f"{frames} frames: the video needs at least 1 frame")
        for name, size in (("height", height), ("width", width)):
            if size % self.pixel_multiple != 0 or size <= 0:
                raise ValueError(
                    f"{name} {size} is not a multiple of {self.pixel_multiple}; "
                    f"nearest valid: {nearest_multiples(size, self.pixel_multiple)}"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageVAEConfig:
        """Build from a diffusers ``AutoencoderKL`` ``config.json`` dict; keys that do not change the math are ignored.

        Settings this class cannot reproduce (other block types, no quant convs, a latent shift) are refused.
        """
        kw = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        if "mid_block_add_attention" in d:
            kw["mid_block_attention"] = bool(d["mid_block_add_attention"])
        for key, wanted in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            kinds = set(d.get(key) or [wanted])
            if kinds != {wanted}:
                raise ValueError(f"config.json {key} {sorted(kinds)}: only {wanted} image VAEs are supported")
        for key in ("use_quant_conv", "use_post_quant_conv"):
            if d.get(key) is False:
                raise ValueError(f"config.json {key}=false: EasyAnimate V1's image VAE has quant convs (the SD VAE)")
        if d.get("shift_factor") not in (None, 0, 0.0) or d.get("latents_mean") is not None:
            raise ValueError("config.json shift_factor/latents_mean: latent shifts are not part of the SD VAE")
        return cls(**kw)


# PixArt-alpha's VAE (stabilityai/sd-vae-ft-ema geometry), which EasyAnimate V1 uses.
IMAGE_VAE_SD = ImageVAEConfig()

# Old diffusers names of the mid-block attention's projections (diffusers renames them the same way on load).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"^(.*mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))$")


def canonical_key(key: str) -> str:
    """``key`` with an old-style mid-block attention name (``query``, ``proj_attn``, ...) renamed to today's."""
    m = _LEGACY_ATTENTION_KEY.match(key)
    return key if m is None else m.group(1) + _LEGACY_ATTENTION[m.group(2)] + m.group(3)


# --------------------------------------------------------------------------------------------------
# Building blocks (diffusers' module names, so state-dict keys match AutoencoderKL's)
# --------------------------------------------------------------------------------------------------


class _Ctx:
    """Constructor arguments shared by every layer: namespace, dtype, device, norm settings."""

    def __init__(self, ops, dtype, device, cfg: ImageVAEConfig):
        self.ops, self.dtype, self.device, self.cfg = ops, dtype, device, cfg

    def conv(self, cin, cout, kernel=3, stride=1, padding=1):
        return self.ops.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dtype=self.dtype, device=self.device)

    def norm(self, channels):
        cfg = self.cfg
        return self.ops.GroupNorm(
            cfg.norm_num_groups, channels, eps=cfg.norm_eps, affine=True, dtype=self.dtype, device=self.device
        )

    def linear(self, cin, cout):
        return self.ops.Linear(cin, cout, bias=True, dtype=self.dtype, device=self.device)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1 when widths differ) shortcut."""

    def __init__(self, ctx: _Ctx, cin: int, cout: int):
        super().__init__()
        self.norm1 = ctx.norm(cin)
        self.conv1 = ctx.conv(cin, cout)
        self.norm2 = ctx.norm(cout)
        self.conv2 = ctx.conv(cout, cout)
        self.conv_shortcut = ctx.conv(cin, cout, kernel=1, padding=0) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,Cin,H,W] -> [N,Cout,H,W]
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + shortcut  # output_scale_factor is 1 in every AutoencoderKL


class MidAttention2D(nn.Module):
    """Single-head self-attention over an image's h*w positions, GroupNorm'd input, residual."""

    def __init__(self, ctx: _Ctx, channels: int):
        super().__init__()
        self.group_norm = ctx.norm(channels)
        self.to_q = ctx.linear(channels, channels)
        self.to_k = ctx.linear(channels, channels)
        self.to_v = ctx.linear(channels, channels)
        self.to_out = nn.ModuleList([ctx.linear(channels, channels)])  # diffusers' [Linear, Dropout]: key to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,C,H,W] -> [N,C,H,W]
        n, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(n, c, h * w).transpose(1, 2)  # [N, HW, C]
        q = self.to_q(tokens).unsqueeze(1)  # [N, 1 head, HW, C]
        k = self.to_k(tokens).unsqueeze(1)
        v = self.to_v(tokens).unsqueeze(1)
        out = self.to_out[0](attention(q, k, v).squeeze(1))  # [N, HW, C]
        return out.transpose(1, 2).reshape(n, c, h, w) + x


class MidBlock2D(nn.Module):
    """resnet, (attention), resnet at the bottleneck width (diffusers' UNetMidBlock2D with one layer)."""

    def __init__(self, ctx: _Ctx, channels: int, with_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ctx, channels, channels) for _ in range(2))
        self.attentions = nn.ModuleList([MidAttention2D(ctx, channels)] if with_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    """Zero-pad right/bottom by one pixel, then a stride-2 3x3 conv without padding (diffusers' padding=0)."""

    def __init__(self, ctx: _Ctx, channels: int):
        super().__init__()
        self.conv = ctx.conv(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,C,H,W] -> [N,C,H/2,W/2]
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest 2x upsample, then a 3x3 conv."""

    def __init__(self, ctx: _Ctx, channels: int):
        super().__init__()
        self.conv = ctx.conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,C,H,W] -> [N,C,2H,2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    """Resnets, then (all but the last block) a downsampler."""

    def __init__(self, ctx: _Ctx, cin: int, cout: int, layers: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ctx, cin if i == 0 else cout, cout) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(ctx, cout)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Resnets (one more than an encoder block), then (all but the last block) an upsampler."""

    def __init__(self, ctx: _Ctx, cin: int, cout: int, layers: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ctx, cin if i == 0 else cout, cout) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(ctx, cout)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Encoder2D(nn.Module):
    """Images [N,3,H,W] -> 2*latent_channels moments at 1/8 size (before quant_conv)."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        cfg = ctx.cfg
        chans = cfg.block_out_channels
        self.conv_in = ctx.conv(cfg.in_channels, chans[0])
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ctx, chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, i < len(chans) - 1)
            for i in range(len(chans))
        )
        self.mid_block = MidBlock2D(ctx, chans[-1], cfg.mid_block_attention)
        self.conv_norm_out = ctx.norm(chans[-1])
        self.conv_out = ctx.conv(chans[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder2D(nn.Module):
    """Latents [N,L,h,w] (after post_quant_conv) -> images [N,3,8h,8w]."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        cfg = ctx.cfg
        rev = tuple(reversed(cfg.block_out_channels))
        self.conv_in = ctx.conv(cfg.latent_channels, rev[0])
        self.mid_block = MidBlock2D(ctx, rev[0], cfg.mid_block_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(ctx, rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, i < len(rev) - 1)
            for i in range(len(rev))
        )
        self.conv_norm_out = ctx.norm(rev[-1])
        self.conv_out = ctx.conv(rev[-1], cfg.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def sample_posterior(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``mean + exp(logvar / 2) * noise`` [B,L,F,h,w], the noise drawn as the official V1 pipeline draws it.

    The official code samples each frame image's posterior with the frames folded into the batch, so its noise is
    one ``randn`` of shape [(B F), L, h, w] on the generator's device; drawing [B, L, F, h, w] directly would put
    the same numbers on other positions. Unscaled: multiply by ``config.scaling_factor`` for DiT latents.
    """
    b, c, f, h, w = mean.shape
    device = generator.device if generator is not None else mean.device
    noise = torch.randn((b * f, c, h, w), generator=generator, device=device, dtype=mean.dtype).to(mean.device)
    noise = noise.unflatten(0, (b, f)).transpose(1, 2)  # [B, L, F, h, w]
    return mean + torch.exp(0.5 * logvar) * noise


# --------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------


def _check_chunk(chunk: int | None, default: int, name: str) -> int:
    if chunk is None:
        return default
    if chunk < 1:
        raise ValueError(f"{name} must be >= 1, got {chunk}")
    return chunk


class ImageVAE(nn.Module):
    """The SD image VAE with MagvitVAE's video interface; state-dict names equal diffusers' AutoencoderKL."""

    # Out of memory, fewer frames per call come before tiles: they lower the peak and never change the output.
    decode_shrinks_chunk_first = True

    def __init__(
        self,
        config: ImageVAEConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations=None,
        **overrides,
    ):
        super().__init__()
        cfg = replace(config or IMAGE_VAE_SD, **overrides)
        self.config = cfg
        ctx = _Ctx(operations or default_operations, dtype, device, cfg)
        self.encoder = Encoder2D(ctx)
        self.decoder = Decoder2D(ctx)
        self.quant_conv = ctx.conv(2 * cfg.latent_channels, 2 * cfg.latent_channels, kernel=1, padding=0)
        self.post_quant_conv = ctx.conv(cfg.latent_channels, cfg.latent_channels, kernel=1, padding=0)
        # The dtype encode/decode compute in; as MagvitVAE: set it when the weights are stored in fp8.
        self.compute_dtype = dtype if dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2 else None

    # ---- helpers ---------------------------------------------------------------------------------

    @property
    def frame_local(self) -> bool:
        """True: every frame is decoded on its own, so chunk sizes never change the output."""
        return True

    def clear_caches(self) -> None:
        """Nothing to forget: no op carries state from one frame to the next."""

    def _dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        stored = self.post_quant_conv.weight.dtype
        return stored if stored.itemsize >= 2 else torch.float32

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a ``frames``-frame video (the same count)."""
        return self.config.latent_frames(frames)

    def video_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames`` latents (the same count)."""
        return self.config.video_frames(latent_frames)

    def check_video_shape(self, shape) -> None:
        """Raise ValueError naming the nearest valid values unless ``shape`` is a video [B, C, F, H, W] it encodes."""
        cfg = self.config
        if len(shape) != 5:
            raise ValueError(
                f"video must be [B, C, F, H, W] (5 dims), got {len(shape)} dims {tuple(shape)}; "
                "give a single image as one frame: image[:, :, None]"
            )
        b, c, f, h, w = shape
        if c != cfg.in_channels:
            raise ValueError(f"video has {c} channels, expected {cfg.in_channels} (RGB in [-1, 1])")
        cfg.check_video_size(f, h, w)

    # ---- encode / decode -------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N,3,H,W] -> posterior moments [N,2L,H/8,W/8] (mean ; logvar), unclamped."""
        return self.quant_conv(self.encoder(images))

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N,L,h,w] (already divided by the scaling factor) -> images [N,3,8h,8w]."""
        return self.decoder(self.post_quant_conv(latents))

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
        """Video [B,3,F,H,W] in [-1,1] -> posterior (mean, logvar), each [B,L,F,H/8,W/8] float32.

        Multiply ``mean`` by ``config.scaling_factor`` to get DiT latents; the official pipeline samples
        ``mean + exp(logvar / 2) * noise`` instead. ``chunk_frames`` frames of every sample go through the
        encoder at once (default 8; any value gives the same moments); ``tile_latent_size`` / ``tile_overlap``
        (latent pixels) encode overlapping spatial tiles and blend the moments linearly.
        """
        self.check_video_shape(video.shape)
        check_tiling(tile_latent_size, tile_overlap)
        chunk = _check_chunk(chunk_frames, DEFAULT_ENCODE_FRAMES, "chunk_frames")
        cfg = self.config
        b, _, f, h, w = video.shape
        s = cfg.spatial_compression
        lh, lw = h // s, w // s
        moments = torch.zeros(b, 2 * cfg.latent_channels, f, lh, lw, device=video.device)
        tiles = spatial_tiles(lh, lw, 1, tile_latent_size, tile_overlap, video.device)
        starts = range(0, f, chunk)
        total, done = len(tiles) * len(starts), 0
        dtype = self._dtype()
        weight_sum = torch.zeros(lh, lw, device=video.device) if len(tiles) > 1 else None
        for tile in tiles:
            ys, xs = tile.lat
            pys, pxs = slice(ys.start * s, ys.stop * s), slice(xs.start * s, xs.stop * s)
            for start in starts:
                end = min(start + chunk, f)
                images = video[:, :, start:end, pys, pxs].transpose(1, 2).flatten(0, 1).to(dtype)  # [B*t, 3, th, tw]
                m = self.encode_images(images).float().unflatten(0, (b, end - start)).transpose(1, 2)  # [B,2L,t,..]
                if tile.weight is None:
                    moments[:, :, start:end] = m
                else:
                    moments[:, :, start:end, ys, xs] += m * tile.weight
                del images, m
                done += 1
                if progress is not None:
                    progress(done, total)
            if weight_sum is not None:
                weight_sum[ys, xs] += tile.weight
        if weight_sum is not None:
            moments /= weight_sum
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

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
    ) -> torch.Tensor:
        """Latents [B,L,T,h,w], ALREADY divided by ``config.scaling_factor`` -> video [B,3,T,8h,8w].

        The output is unclamped (roughly [-1, 1]) and written into ``out`` (preallocated, any float dtype) or
        a new float32 tensor on the latents' device. ``chunk_latents`` latent frames of every sample are decoded
        per call (default 1, as the official loop; any value gives the same frames). ``frame_by_frame`` is
        accepted for MagvitVAE's signature: decoding here is always per frame. ``tile_latent_size`` and
        ``tile_overlap`` (latent pixels, default a quarter tile) decode overlapping spatial tiles and blend them
        linearly. ``progress(done, total)`` is called after every call; raising from it stops the decode.
        """
        cfg = self.config
        if latents.ndim != 5:
            raise ValueError(
                f"latents must be [B, C, T, h, w] (5 dims), got {latents.ndim} dims {tuple(latents.shape)}; "
                "give image latents as one frame: latents[:, :, None]"
            )
        b, c, t, lh, lw = latents.shape
        if c != cfg.latent_channels:
            raise ValueError(f"latents have {c} channels, expected latent_channels={cfg.latent_channels}")
        if t < 1 or lh < 1 or lw < 1:
            raise ValueError(f"latents must have at least one frame and pixel, got {tuple(latents.shape)}")
        check_tiling(tile_latent_size, tile_overlap)
        chunk = _check_chunk(chunk_latents, DEFAULT_DECODE_LATENTS, "chunk_latents")
        s = cfg.spatial_compression
        shape = (b, cfg.out_channels, t, lh * s, lw * s)
        if out is None:
            out = torch.empty(shape, device=latents.device, dtype=torch.float32)
        elif tuple(out.shape) != shape or not out.dtype.is_floating_point:
            raise ValueError(f"out must be a float tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
        tiles = spatial_tiles(lh, lw, s, tile_latent_size, tile_overlap, out.device)
        starts = range(0, t, chunk)
        total, done = len(tiles) * len(starts), 0
        dtype = self._dtype()
        weight_sum = None
        if len(tiles) > 1:
            out.zero_()
            weight_sum = torch.zeros(shape[3:], device=out.device)
        for tile in tiles:
            ys, xs = tile.pix
            for start in starts:
                end = min(start + chunk, t)
                z = latents[:, :, start:end, tile.lat[0], tile.lat[1]].transpose(1, 2).flatten(0, 1).to(dtype)
                frames = self.decode_images(z).unflatten(0, (b, end - start)).transpose(1, 2)  # [B, 3, t, th, tw]
                if tile.weight is None:
                    out[:, :, start:end] = frames
                else:
                    out[:, :, start:end, ys, xs] += frames.float() * tile.weight
                del z, frames
                done += 1
                if progress is not None:
                    progress(done, total)
            if weight_sum is not None:
                weight_sum[ys, xs] += tile.weight
        if weight_sum is not None:
            out /= weight_sum.to(out.dtype)
        return out

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``video`` through the posterior mean (a convenience for checks)."""
        mean, _ = self.encode(video)
        return self.decode(mean)


# --------------------------------------------------------------------------------------------------
# Memory planning (vae.py's contract; the ComfyUI nodes dispatch on the VAE type). The out-of-memory retries are
# vae.py's decode_with_retry / encode_with_retry, re-exported here for that dispatch.
# --------------------------------------------------------------------------------------------------

# Working memory of decode / encode in elements of the compute dtype, for the SD geometry (block_out_channels
# starting at 128; scaled linearly for narrower VAEs), output tensor excluded. Every frame of a call is one image
# of the batch, so the peak grows with frames per call times tile area; the video's length does not change it.
# Measured on CPU in float32 by bench/bench_image_vae_memory.py (RSS high-water mark above the loaded weights,
# 64-256 px frames, 1-4 frames per call, untiled and 8-latent tiles):
# * decode: 58k-93k elements per latent pixel of each frame of a call (58k for 2-4 frames per call, 67k-72k for
#   one 128-256 px frame, 85k for one 64 px frame, 93k for 8x8-latent tiles). We count 80k: -14%..+38%.
# * encode: 769-922 per pixel of each frame of a call. We count 900: -2%..+17%.
# (ComfyUI's own estimate for the SD VAE, sized for its GPU paths, is 139k and 1767.)
DECODE_PER_LATENT_PIXEL = 80_000
ENCODE_PER_PIXEL = 900
# Largest automatic frames per call: a progress update and an interrupt check every 8 frames.
MAX_AUTO_FRAMES = 8
AUTO = ChunkTile()  # every frames-per-call / tile setting planned


def decode_memory(
    config: ImageVAEConfig, latent_shape, dtype: torch.dtype, chunk_latents: int | None = None, tile: int | None = None
) -> int:
    """Bytes of working memory ``ImageVAE.decode`` needs for latents of ``latent_shape`` (output excluded)."""
    b, _, t, h, w = latent_shape
    chunk = min(chunk_latents or DEFAULT_DECODE_LATENTS, max(t, 1))
    return int(b * chunk * tile_area(h, w, tile) * DECODE_PER_LATENT_PIXEL * width_scale(config) * dtype.itemsize)


def encode_memory(
    config: ImageVAEConfig, video_shape, dtype: torch.dtype, chunk_frames: int | None = None, tile: int | None = None
) -> int:
    """Bytes of working memory ``ImageVAE.encode`` needs for a video of ``video_shape`` (output excluded)."""
    b, _, f, h, w = video_shape
    s = config.spatial_compression
    chunk = min(chunk_frames or DEFAULT_ENCODE_FRAMES, max(f, 1))
    pixels = tile_area(h // s, w // s, tile) * s * s
    return int(b * chunk * pixels * ENCODE_PER_PIXEL * width_scale(config) * dtype.itemsize)


def _plan(
    memory: Callable[[tuple, int, int | None], int],
    shape: tuple,
    latent_hw: tuple[int, int],
    one_latent_pixel: tuple,
    budget: float,
    requested: ChunkTile,
    min_tile: int,
) -> ChunkTile:
    """The most frames per call (up to MAX_AUTO_FRAMES) that fit ``budget``, then the largest tile that fits.

    ``memory(shape, chunk, tile)`` is the bytes estimate; ``one_latent_pixel`` the shape of one latent pixel's input.
    """
    chunk = requested.chunk
    if chunk is None:
        most = min(MAX_AUTO_FRAMES, max(shape[2], 1))
        fits = [c for c in range(1, most + 1) if memory(shape, c, requested.tile) <= budget]
        chunk = fits[-1] if fits else 1
    tile = requested.tile
    if tile is None:
        tile = largest_tile(*latent_hw, memory(one_latent_pixel, chunk, None), budget, min_tile)
    return ChunkTile(chunk, tile, requested.overlap)


def plan_decode(
    vae: ImageVAE,
    latent_shape,
    dtype: torch.dtype,
    budget_bytes: float,
    requested: ChunkTile = AUTO,
    min_tile: int = MIN_TILE_LATENTS,
) -> ChunkTile:
    """Fill the ``None`` fields of ``requested``: the most frames per call, then the largest tile that fit.

    Frames first: fewer frames per call lower the peak without changing the output, where tiles blend seams.
    """
    b, _, t, h, w = latent_shape

    def memory(shape, chunk, tile):
        return decode_memory(vae.config, shape, dtype, chunk, tile)

    return _plan(memory, latent_shape, (h, w), (b, 0, t, 1, 1), budget_bytes, requested, min_tile)


def plan_encode(
    vae: ImageVAE,
    video_shape,
    dtype: torch.dtype,
    budget_bytes: float,
    requested: ChunkTile = AUTO,
    min_tile: int = MIN_TILE_LATENTS,
) -> ChunkTile:
    """Fill the ``None`` fields of ``requested``: the most frames per call, then the largest tile that fit."""
    b, _, f, h, w = video_shape
    s = vae.config.spatial_compression

    def memory(shape, chunk, tile):
        return encode_memory(vae.config, shape, dtype, chunk, tile)

    return _plan(memory, video_shape, (h // s, w // s), (b, 0, f, s, s), budget_bytes, requested, min_tile)
