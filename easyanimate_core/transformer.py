"""EasyAnimate V5 / V5.1 transformer: an MMDiT with 3-D RoPE over (frame, row, column) tokens.

One file, small modules. Layer names follow the official checkpoints (``attn2.*`` holds the text
stream's projections); ``easyanimate_core.keys`` converts to and from diffusers' names.

Shapes: B batch, C latent channels, F latent frames, H/W latent height/width, p patch size,
N = F*(H/p)*(W/p) video tokens, S text tokens, D = heads*head_dim model width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .ops import default_operations, layer_norm_fp32, rms_norm_fp32

# Behaviours in which the official EasyAnimate code (that the released weights were trained with)
# and diffusers 0.42 differ. "official" is the default everywhere; "diffusers" exists to prove
# numerical parity with the reference port.
COMPAT_MODES = ("official", "diffusers")


@dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of the V5 / V5.1 transformer; field names match the checkpoints' config.json."""

    num_attention_heads: int = 48
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    num_layers: int = 48
    mmdit_layers: int = 48  # the first `mmdit_layers` blocks are dual-stream, the rest single-stream
    time_embed_dim: int = 512
    text_embed_dim: int = 3584
    text_embed_dim_t5: int | None = None  # V5's second (mT5) text stream
    add_norm_text_encoder: bool = False  # V5.1: RMSNorm before text_proj
    norm_eps: float = 1e-5
    norm_elementwise_affine: bool = True
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    after_norm: bool = False
    # RoPE base grid in latent pixels (480/8 x 720/8); the token grid is fitted into it.
    rope_base_height: int = 60
    rope_base_width: int = 90
    compat: str = "official"

    @classmethod
    def from_dict(cls, d: dict) -> TransformerConfig:
        """Build from a config.json dict (official or diffusers); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("mmdit_layers") is not None and "num_layers" in kwargs:
            kwargs["mmdit_layers"] = min(kwargs["mmdit_layers"], kwargs["num_layers"])
        return cls(**kwargs)

    def replace(self, **changes) -> TransformerConfig:
        return dataclasses.replace(self, **changes)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# Size presets of the released models (spec §3.1). The variant only changes in_channels.
V5_12B = TransformerConfig(num_layers=48, mmdit_layers=48, text_embed_dim=1024, text_embed_dim_t5=2048)
V5_7B = V5_12B.replace(num_layers=36, mmdit_layers=18)
V51_12B = TransformerConfig(num_layers=48, mmdit_layers=48, text_embed_dim=3584, add_norm_text_encoder=True)
V51_7B = V51_12B.replace(num_layers=36, mmdit_layers=18)
# in_channels per variant: noisy latents 16 (+ mask 1 + masked video 16) (+ control 16) (+ reference 16).
VARIANT_IN_CHANNELS = {
    "V5": {"T2V": 16, "InP": 33, "Control": 32},
    "V5.1": {"T2V": 16, "InP": 33, "Control": 48, "Camera": 38},
}


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


def timestep_sinusoid(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim] (float32), cos first when ``flip_sin_to_cos``."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def rope_grid_crop(grid_h: int, grid_w: int, base_h: int, base_w: int) -> tuple[int, int, int, int]:
    """Fit a (grid_h, grid_w) token grid into the (base_h, base_w) base grid: (top, left, bottom, right)."""
    if grid_h / grid_w > base_h / base_w:
        resize_h, resize_w = base_h, round(base_h / grid_h * grid_w)
    else:
        resize_h, resize_w = round(base_w / grid_w * grid_h), base_w
    top = round((base_h - resize_h) / 2.0)
    left = round((base_w - resize_w) / 2.0)
    return top, left, top + resize_h, left + resize_w


def _grid_positions(start: int, stop: int, n: int, compat: str) -> torch.Tensor:
    """n positions spanning [start, stop) of the crop box."""
    i = torch.arange(n, dtype=torch.float64)
    if compat == "diffusers":
        # diffusers >= 0.32 computes linspace(start, stop*(n-1)/n, n): differs when start != 0.
        end = stop * (n - 1) / n
        pos = start + (end - start) * i / max(n - 1, 1) if n > 1 else torch.full((1,), float(start))
    else:
        # The official code (diffusers <= 0.31): numpy linspace(start, stop, n, endpoint=False).
        pos = start + (stop - start) * i / n
    return pos.float()


def _axis_freqs(
    dim: int, pos: torch.Tensor, theta: float, replace: tuple[int, float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(pos), dim] with each frequency repeated twice (interleaved pairs); ``replace`` = (index,
    frequency) sets one frequency (RIFLEx)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if replace is not None:
        freqs[replace[0]] = replace[1]
    angles = torch.outer(pos, freqs)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def rope_3d(
    frames: int,
    grid_h: int,
    grid_w: int,
    head_dim: int,
    base_h: int,
    base_w: int,
    compat: str = "official",
    theta: float = 10000.0,
    device: torch.device | None = None,
    temporal_frequency: tuple[int, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D rotary table (cos, sin), each [frames*grid_h*grid_w, head_dim] float32, tokens in (t, h, w) order.

    head_dim is split [t: D/4 | h: 3D/8 | w: 3D/8]; spatial positions come from fitting the token
    grid into the base grid (not integer indices), temporal positions are 0..frames-1.
    ``temporal_frequency`` = (index, frequency): one temporal frequency changed (RIFLEx, ``context.riflex_frequency``).
    """
    if head_dim % 16:
        raise ValueError(f"3-D RoPE needs attention_head_dim divisible by 16, got {head_dim}")
    top, left, bottom, right = rope_grid_crop(grid_h, grid_w, base_h, base_w)
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    pos_t = torch.arange(frames, dtype=torch.float32)
    cos_t, sin_t = _axis_freqs(dim_t, pos_t, theta, temporal_frequency)
    cos_h, sin_h = _axis_freqs(dim_hw, _grid_positions(top, bottom, grid_h, compat), theta)
    cos_w, sin_w = _axis_freqs(dim_hw, _grid_positions(left, right, grid_w, compat), theta)

    def combine(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t = t[:, None, None, :].expand(frames, grid_h, grid_w, -1)
        h = h[None, :, None, :].expand(frames, grid_h, grid_w, -1)
        w = w[None, None, :, :].expand(frames, grid_h, grid_w, -1)
        return torch.cat([t, h, w], dim=-1).reshape(frames * grid_h * grid_w, head_dim)

    return combine(cos_t, cos_h, cos_w).to(device), combine(sin_t, sin_h, sin_w).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, heads, N, D] by the table [N, D]; computed in float32."""
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x_odd, x_even], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal timestep embedding."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        dtype=None,
        device=None,
        operations=default_operations,
    ):
        super().__init__()
        self.linear_1 = operations.Linear(in_dim, out_dim, dtype=dtype, device=device)
        self.linear_2 = operations.Linear(out_dim, out_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class AdaptiveLayerNorm(nn.Module):
    """A LayerNorm plus a Linear that turns the timestep embedding into ``num_mods`` modulation vectors."""

    def __init__(
        self,
        cond_dim: int,
        dim: int,
        num_mods: int,
        eps: float,
        affine: bool,
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        self.linear = operations.Linear(cond_dim, num_mods * dim, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(dim, eps=eps, elementwise_affine=affine, dtype=dtype, device=device)
        self.num_mods = num_mods

    def modulations(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """temb [B, T] -> ``num_mods`` tensors [B, 1, D]."""
        return self.linear(F.silu(temb))[:, None, :].chunk(self.num_mods, dim=-1)


class LayerNormZero(AdaptiveLayerNorm):
    """adaLN for both streams: one fp32 LayerNorm, six modulations (shift, scale, gate) x (video, text)."""

    def __init__(self, cond_dim: int, dim: int, eps: float, affine: bool, **kw):
        super().__init__(cond_dim, dim, 6, eps, affine, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor):
        # x [B, N, D], context [B, S, D], temb [B, T] -> modulated x, context and their gates [B, 1, D]
        shift, scale, gate, ctx_shift, ctx_scale, ctx_gate = self.modulations(temb)
        x = layer_norm_fp32(self.norm, x) * (1 + scale) + shift
        context = layer_norm_fp32(self.norm, context) * (1 + ctx_scale) + ctx_shift
        return x, context, gate, ctx_gate


class QKVProjection(nn.Module):
    """q, k, v projections with per-head LayerNorm on q and k, and the output projection."""

    def __init__(self, dim: int, heads: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.to_q = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.to_k = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.to_v = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.norm_q = operations.LayerNorm(head_dim, eps=1e-6, dtype=dtype, device=device)
        self.norm_k = operations.LayerNorm(head_dim, eps=1e-6, dtype=dtype, device=device)
        # A list so the checkpoint key is `to_out.0.*` (slot 1 was a dropout).
        self.to_out = nn.ModuleList([operations.Linear(dim, dim, dtype=dtype, device=device)])

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, D] -> q, k, v each [B, heads, L, head_dim], q and k normalised."""

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = self.norm_q(split_heads(self.to_q(x)))
        k = self.norm_k(split_heads(self.to_k(x)))
        return q, k, split_heads(self.to_v(x))


class FeedForward(nn.Module):
    """Linear -> tanh-GELU -> Linear (keys `net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, inner_dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        proj_in = nn.Module()
        proj_in.proj = operations.Linear(dim, inner_dim, dtype=dtype, device=device)
        self.net = nn.ModuleList(
            [
                proj_in,
                nn.Identity(),
                operations.Linear(inner_dim, dim, dtype=dtype, device=device),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


FP16_MAX = torch.finfo(torch.float16).max


def fp16_safe(x: torch.Tensor) -> torch.Tensor:
    """``x`` with inf clamped to the fp16 range and NaN zeroed, in fp16 only (other dtypes untouched).

    The residual stream and the 4x-wide feed-forward of a large DiT can exceed fp16's 65504; one inf
    turns into NaN at the next LayerNorm and the whole video goes black. ComfyUI does the same for
    its fp16 models (Flux, HunyuanVideo). bf16 and fp32 have the range and are returned as they are.
    """
    if x.dtype != torch.float16:
        return x
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


class EasyAnimateBlock(nn.Module):
    """One transformer block: joint attention over [text ; video] then feed-forward, both adaLN-gated.

    A dual-stream (MMDiT) block has separate text weights (`attn2`, `txt_ff`); a single-stream
    block runs the text through the video weights.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        time_embed_dim: int,
        norm_eps: float,
        norm_affine: bool,
        dual_stream: bool,
        after_norm: bool = False,
        compat: str = "official",
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        kw = {"dtype": dtype, "device": device, "operations": operations}
        self.dual_stream = dual_stream
        self.compat = compat
        self.norm1 = LayerNormZero(time_embed_dim, dim, norm_eps, norm_affine, **kw)
        self.attn1 = QKVProjection(dim, heads, **kw)
        self.attn2 = QKVProjection(dim, heads, **kw) if dual_stream else None
        self.norm2 = LayerNormZero(time_embed_dim, dim, norm_eps, norm_affine, **kw)
        self.ff = FeedForward(dim, 4 * dim, **kw)
        self.txt_ff = FeedForward(dim, 4 * dim, **kw) if dual_stream else None
        self.norm3 = None
        if after_norm:
            self.norm3 = operations.LayerNorm(
                dim,
                eps=norm_eps,
                elementwise_affine=norm_affine,
                dtype=dtype,
                device=device,
            )

    def joint_attention(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ):
        """x [B, N, D], context [B, S, D] -> attention outputs for both, RoPE on the video tokens only."""
        s = context.shape[1]
        if self.dual_stream:
            q, k, v = self.attn1.qkv(x)
            q_txt, k_txt, v_txt = self.attn2.qkv(context)
            q, k, v = (
                torch.cat([q_txt, q], 2),
                torch.cat([k_txt, k], 2),
                torch.cat([v_txt, v], 2),
            )
        else:
            q, k, v = self.attn1.qkv(torch.cat([context, x], dim=1))
        cos, sin = rope
        q = torch.cat([q[:, :, :s], apply_rope(q[:, :, s:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :s], apply_rope(k[:, :, s:], cos, sin)], dim=2)
        out = attention(q, k, v).transpose(1, 2).flatten(2)  # [B, S+N, D]
        out_txt, out_vid = out[:, :s], out[:, s:]
        if self.dual_stream:
            return self.attn1.to_out[0](out_vid), self.attn2.to_out[0](out_txt)
        if self.compat == "diffusers":
            # diffusers 0.42 leaves the text part of a single-stream block unprojected.
            return self.attn1.to_out[0](out_vid), out_txt
        return self.attn1.to_out[0](out_vid), self.attn1.to_out[0](out_txt)

    def feed_forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The video and text feed-forwards (text shares the video one in a single-stream block)."""
        x = self.ff(x)
        context = (self.txt_ff or self.ff)(context)
        if self.norm3 is not None:
            x, context = (
                layer_norm_fp32(self.norm3, x),
                layer_norm_fp32(self.norm3, context),
            )
        return x, context

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rope):
        nx, nc, gate, ctx_gate = self.norm1(x, context, temb)
        attn_x, attn_c = self.joint_attention(nx, nc, rope)
        x = fp16_safe(x + gate * attn_x)
        context = fp16_safe(context + ctx_gate * attn_c)

        nx, nc, gate, ctx_gate = self.norm2(x, context, temb)
        ff_x, ff_c = self.feed_forward(nx, nc)
        return fp16_safe(x + gate * fp16_safe(ff_x)), fp16_safe(context + ctx_gate * fp16_safe(ff_c))


class AdaLayerNormOut(AdaptiveLayerNorm):
    """Final adaLN: LayerNorm modulated by (shift, scale) from the timestep embedding."""

    def __init__(self, cond_dim: int, dim: int, eps: float, affine: bool, **kw):
        super().__init__(cond_dim, dim, 2, eps, affine, **kw)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulations(temb)
        return self.norm(x) * (1 + scale) + shift


class TextProjection(nn.Sequential):
    """V5.1 text projection: fp32 RMSNorm then Linear (keys `0.weight`, `1.weight`, `1.bias`)."""

    def __init__(self, in_dim: int, out_dim: int, dtype=None, device=None, operations=None):
        super().__init__(
            operations.RMSNorm(in_dim, eps=1e-6, elementwise_affine=True, dtype=dtype, device=device),
            operations.Linear(in_dim, out_dim, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](rms_norm_fp32(self[0], x))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class EasyAnimateTransformer3D(nn.Module):
    """The V5 / V5.1 denoiser: latents [B, C, F, H, W] + timestep + text states -> prediction [B, C, F, H, W]."""

    def __init__(
        self,
        config: TransformerConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations=None,
        **overrides,
    ):
        super().__init__()
        config = (config or TransformerConfig()).replace(**overrides)
        if config.compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {config.compat!r}")
        self.config = config
        self.dtype = dtype or torch.float32
        operations = operations or default_operations
        kw = {"dtype": dtype, "device": device, "operations": operations}
        dim, p = config.inner_dim, config.patch_size

        self.time_embedding = TimestepEmbedding(dim, config.time_embed_dim, **kw)
        self.proj = operations.Conv2d(config.in_channels, dim, kernel_size=p, stride=p, dtype=dtype, device=device)
        self.text_proj_t5 = None
        if config.add_norm_text_encoder:
            self.text_proj = TextProjection(config.text_embed_dim, dim, **kw)
            if config.text_embed_dim_t5 is not None:
                self.text_proj_t5 = TextProjection(config.text_embed_dim_t5, dim, **kw)
        else:
            self.text_proj = operations.Linear(config.text_embed_dim, dim, dtype=dtype, device=device)
            if config.text_embed_dim_t5 is not None:
                self.text_proj_t5 = operations.Linear(config.text_embed_dim_t5, dim, dtype=dtype, device=device)

        self.transformer_blocks = nn.ModuleList(
            EasyAnimateBlock(
                dim,
                config.num_attention_heads,
                config.time_embed_dim,
                config.norm_eps,
                config.norm_elementwise_affine,
                dual_stream=i < config.mmdit_layers,
                after_norm=config.after_norm,
                compat=config.compat,
                **kw,
            )
            for i in range(config.num_layers)
        )
        affine = config.norm_elementwise_affine
        self.norm_final = operations.LayerNorm(
            dim,
            eps=config.norm_eps,
            elementwise_affine=affine,
            dtype=dtype,
            device=device,
        )
        self.norm_out = AdaLayerNormOut(config.time_embed_dim, dim, config.norm_eps, affine, **kw)
        self.proj_out = operations.Linear(dim, p * p * config.out_channels, dtype=dtype, device=device)
        self.gradient_checkpointing = False

    def validate_inputs(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_t5: torch.Tensor | None,
        inpaint_latents: torch.Tensor | None,
        control_latents: torch.Tensor | None,
    ) -> None:
        """Raise ValueError naming the rule before any compute."""
        cfg = self.config
        if hidden_states.ndim != 5:
            raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(hidden_states.shape)}")
        b, c, _f, h, w = hidden_states.shape
        if c != cfg.out_channels:
            raise ValueError(f"latents have {c} channels; this model denoises {cfg.out_channels}-channel latents")
        p = cfg.patch_size
        for name, size in (("height", h), ("width", w)):
            if size % p:
                lo, hi = size - size % p, size - size % p + p
                raise ValueError(
                    f"latent {name} {size} is not divisible by the patch size {p} "
                    f"(pixel {name} must be a multiple of {8 * p}); nearest valid latent {name}: {lo or hi} or {hi}"
                )
        extra = {"inpaint_latents": inpaint_latents, "control_latents": control_latents}
        total = c
        for name, t in extra.items():
            if t is None:
                continue
            if t.shape[0] != b or t.shape[2:] != hidden_states.shape[2:]:
                raise ValueError(f"{name} shape {tuple(t.shape)} does not match latents {tuple(hidden_states.shape)}")
            total += t.shape[1]
        if total != cfg.in_channels:
            given = " + ".join(f"{n} {t.shape[1]}" for n, t in extra.items() if t is not None)
            raise ValueError(
                f"the model takes {cfg.in_channels} input channels but got {total} (latents {c}"
                f"{' + ' + given if given else ''}); {describe_in_channels(cfg.in_channels)}"
            )
        if encoder_hidden_states is None or encoder_hidden_states.ndim != 3:
            raise ValueError("encoder_hidden_states must be [B, S, text_embed_dim]")
        if encoder_hidden_states.shape[-1] != cfg.text_embed_dim:
            raise ValueError(
                f"text states have width {encoder_hidden_states.shape[-1]}; this model expects {cfg.text_embed_dim}"
            )
        if (encoder_hidden_states_t5 is not None) != (self.text_proj_t5 is not None):
            raise ValueError(
                "this model takes a second (mT5) text stream"
                if self.text_proj_t5 is not None
                else "this model has no second text stream; pass encoder_hidden_states_t5=None"
            )

    def rope(
        self, frames: int, grid_h: int, grid_w: int, device, temporal_frequency: tuple[int, float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        p = cfg.patch_size
        base_h, base_w = cfg.rope_base_height // p, cfg.rope_base_width // p
        return rope_3d(
            frames,
            grid_h,
            grid_w,
            cfg.attention_head_dim,
            base_h,
            base_w,
            cfg.compat,
            device=device,
            temporal_frequency=temporal_frequency,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_t5: torch.Tensor | None = None,
        inpaint_latents: torch.Tensor | None = None,
        control_latents: torch.Tensor | None = None,
        rope_temporal_frequency: tuple[int, float] | None = None,
        step_cache=None,
        sequence_parallel=None,
    ) -> torch.Tensor:
        """Predict v (V5) or the flow velocity (V5.1). ``timestep`` [B] is in [0, 1000].

        ``step_cache``: ``StepCache.for_call(...)`` (step_cache.py): may skip the blocks, reusing their last residual.

        ``sequence_parallel``: ``parallel.SequenceParallel``: this process runs the blocks on its shard of the video
        tokens; every process of its group returns the whole prediction.

        ``rope_temporal_frequency`` = (index, frequency): RIFLEx's temporal RoPE change (``context.riflex_frequency``).
        """
        self.validate_inputs(
            hidden_states,
            encoder_hidden_states,
            encoder_hidden_states_t5,
            inpaint_latents,
            control_latents,
        )
        cfg = self.config
        b, c, f, h, w = hidden_states.shape
        p = cfg.patch_size
        gh, gw = h // p, w // p
        dtype = hidden_states.dtype
        if timestep.ndim == 0:
            timestep = timestep.expand(b)

        temb = timestep_sinusoid(timestep, cfg.inner_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype)
        temb = self.time_embedding(temb)  # [B, time_embed_dim]
        rope = self.rope(f, gh, gw, hidden_states.device, rope_temporal_frequency)

        x = torch.cat(
            [t for t in (hidden_states, inpaint_latents, control_latents) if t is not None],
            dim=1,
        )
        x = self.proj(x.transpose(1, 2).flatten(0, 1))  # [B*F, D, gh, gw]
        x = x.unflatten(0, (b, f)).flatten(3).transpose(2, 3).flatten(1, 2)  # [B, N, D], tokens (t, h, w)

        context = self.text_proj(encoder_hidden_states)  # [B, S, D]
        if encoder_hidden_states_t5 is not None:
            context = torch.cat([context, self.text_proj_t5(encoder_hidden_states_t5)], dim=1)
        sp = sequence_parallel
        if sp is not None:  # this rank's tokens [B, N/P, D] and their rows of the RoPE table
            sp.layout.check_model(cfg.num_attention_heads, x.shape[1])
            x, rope = sp.shard(x), tuple(sp.shard(t, dim=0) for t in rope)

        def run_blocks(x: torch.Tensor) -> torch.Tensor:
            c = context
            for block in self.transformer_blocks:
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x, c = checkpoint(block, x, c, temb, rope, use_reentrant=False)
                else:
                    x, c = block(x, c, temb, rope)
            return x  # the text tokens end here: the output reads the video tokens only

        with contextlib.nullcontext() if sp is None else sp.joint_attention(context.shape[1]):
            if step_cache is None:
                x = run_blocks(x)
            else:  # TeaCache's signal: the first block's timestep-modulated video input (all of it: one decision)
                signal = self.transformer_blocks[0].norm1(x, context, temb)[0]
                x = step_cache(signal if sp is None else sp.gather(signal), x, run_blocks)

        x = self.norm_out(self.norm_final(x), temb)
        x = self.proj_out(x)  # [B, N, C*p*p], last axis laid out (c, p_h, p_w)
        if sp is not None:
            x = sp.gather(x)
        x = x.reshape(b, f, gh, gw, c, p, p)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


def describe_in_channels(in_channels: int) -> str:
    """What a model with this many input channels expects, in words."""
    known = {
        16: "a text-to-video model: latents only",
        33: "an InP model: latents 16 + inpaint_latents 17 (mask 1 + masked video 16)",
        32: "a V5 Control model: latents 16 + control_latents 16",
        48: "a V5.1 Control model: latents 16 + control_latents 32 (control 16 + reference 16)",
        38: "a V5.1 Camera model: latents 16 + control_latents 22 (camera rays 6 + reference 16)",
    }
    return known.get(in_channels, f"{in_channels} channels in all")
