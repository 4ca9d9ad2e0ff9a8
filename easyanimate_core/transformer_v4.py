"""EasyAnimate V4 transformer: a HunyuanDiT-style 3-D DiT with long skips, 2-D RoPE and CLIP image conditioning.

One file, small modules. Layer names follow the official ``HunyuanTransformer3DModel`` checkpoints (spec
``easyanimate_arch.md`` §1), so a released ``transformer/`` folder loads without renaming.

Shapes: B batch, C latent channels (4), F latent frames, H/W latent height/width, p patch size,
N = F*(H/p)*(W/p) video tokens, D = heads*head_dim model width (1408), S = 77 + 256 text tokens.

What the released model does, in order (spec §1.3-§1.5):
* tokens: a 2x2 patch conv per frame over [latents ; inpaint latents], ordered (frame, row, column);
  no learned position embedding. Space is encoded by a 2-D RoPE of ONE frame, tiled over the frames;
  time by a fixed sinusoidal table added to the residual stream at the start of every block.
* conditioning vector: timestep embedding + MLP(pooled mT5 states, image-size meta, style).
* text: BERT (77) and projected mT5 (256) states concatenated; padding positions (mask 0) are replaced
  by a learned table. Cross-attention itself is unmasked and rotates the query only (Hunyuan quirk).
* image (InP): CLIP ViT-L/14 patch features through a perceiver resampler into n_query tokens, or a
  learned padding where the image mask is 0, read by a separate gated cross-attention in every block.
* 40 blocks with U-Net long skips (blocks 0..L/2-2 push, blocks L/2+1.. pop), adaLN-shift only.
* output: 8 channels (4 predicted + 4 learned variance), unpatchified channel-last.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .ops import cast_param, default_operations, layer_norm_fp32
from .transformer import (
    COMPAT_MODES,
    FeedForward,
    TimestepEmbedding,
    _axis_freqs,
    _grid_positions,
    apply_rope,
    fp16_safe,
    rope_grid_crop,
    timestep_sinusoid,
)

ROPE_BASE_PIXELS = 512  # the 2-D RoPE fits every token grid into the grid of a 512x512 image
VAE_SPATIAL = 8  # the slice VAE's spatial compression (pixels per latent), for the default image-size meta
ORIGINAL_SIZE = (1024, 1024)  # the image-size meta's "original size" every official V4 pipeline passes
TIME_TABLE_LENGTH = 512  # rows of the temporal sinusoidal table (latent frames)
POOLER_HEADS = 8  # heads of the mT5 attention pooler (fixed in the official code)
META_EMBED_DIM = 256  # sinusoid width of the timestep and of each of the 6 image-size numbers


@dataclass(frozen=True)
class TransformerV4Config:
    """Hyperparameters of the V4 transformer; field names match the official config.json where it has them."""

    num_attention_heads: int = 16
    attention_head_dim: int = 88
    in_channels: int = 12  # 4 noisy latent + 4 mask latent + 4 masked-video latent
    out_channels: int = 8  # learn_sigma: 4 predicted + 4 variance
    patch_size: int = 2
    num_layers: int = 40
    mlp_ratio: float = 4.3637
    ff_inner_dim: int | None = None  # overrides int(inner_dim * mlp_ratio); loaders set it from the tensors
    learn_sigma: bool = True
    cross_attention_dim: int = 1024  # BERT width, also the width of every text / image token
    cross_attention_dim_t5: int = 2048  # mT5-XL width
    pooled_projection_dim: int = 1024
    text_len: int = 77
    text_len_t5: int = 256
    n_query: int = 16  # image tokens out of the resampler (a square number)
    projection_dim: int = 1024  # CLIP vision width; a kv projection exists only if it differs from cross_attention_dim
    time_position_encoding: bool = True  # the V4 yaml turns it on over the checkpoint's config
    after_norm: bool = False
    enable_clip_in_inpaint: bool = True
    norm_eps: float = 1e-6
    # Block 0's self-attention rotates q/k in the V4-era code the weights were trained with (True); the
    # official code since V5 passes a flag that turns it off there (False). Spec §1.4, §10.1.
    rope_in_first_block: bool = True
    compat: str = "official"  # RoPE grid positions: "official" (diffusers <= 0.31) or "diffusers" (>= 0.32)

    @classmethod
    def from_dict(cls, d: dict) -> TransformerV4Config:
        """Build from an official config.json dict; unknown keys are ignored, mlp_ratio is kept."""
        block_type = d.get("basic_block_type", "basic")
        if block_type != "basic":
            raise ValueError(
                f"V4 transformer basic_block_type {block_type!r} is not supported; the released V4 uses 'basic'"
            )
        heads, head_dim = d.get("num_attention_heads"), d.get("attention_head_dim")
        hidden = d.get("hidden_size")
        if hidden is not None and heads and head_dim and hidden != heads * head_dim:
            raise ValueError(f"hidden_size {hidden} must equal num_attention_heads x attention_head_dim")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def replace(self, **changes) -> TransformerV4Config:
        return dataclasses.replace(self, **changes)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ff_dim(self) -> int:
        return self.ff_inner_dim or int(self.inner_dim * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy latents (and of the prediction the pipeline keeps)."""
        return self.out_channels // 2 if self.learn_sigma else self.out_channels

    @property
    def inpaint_channels(self) -> int:
        """Channels of ``inpaint_latents`` (mask latents + masked-video latents); 0 for a text-to-video model."""
        return self.in_channels - self.latent_channels

    @property
    def has_clip(self) -> bool:
        """Whether the model has the CLIP image branch (an inpaint model with enable_clip_in_inpaint)."""
        enable_inpaint = (
            2 * self.in_channels != self.out_channels if self.learn_sigma else self.in_channels != self.out_channels
        )
        return enable_inpaint and self.enable_clip_in_inpaint

    @property
    def skip_layers(self) -> tuple[range, range]:
        """(blocks whose output is pushed for a long skip, blocks that pop one), spec §10.2."""
        half = self.num_layers // 2
        return range(0, half - 1), range(half + 1, self.num_layers)


# The released model (EasyAnimateV4-XL-2-InP): HunyuanDiT-g/2 geometry, spec §1.1.
V4_XL = TransformerV4Config()


# --------------------------------------------------------------------------------------------------
# Position encodings
# --------------------------------------------------------------------------------------------------


def rope_2d(
    grid_h: int,
    grid_w: int,
    head_dim: int,
    base: int,
    compat: str = "official",
    theta: float = 10000.0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HunyuanDiT 2-D rotary table (cos, sin), each [grid_h*grid_w, head_dim] float32, tokens row-major.

    The grid is fitted into a ``base`` x ``base`` square; the first half of head_dim rotates by the
    column position, the second half by the row position (spec §1.5).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs attention_head_dim divisible by 4, got {head_dim}")
    top, left, bottom, right = rope_grid_crop(grid_h, grid_w, base, base)
    half = head_dim // 2
    cos_w, sin_w = _axis_freqs(half, _grid_positions(left, right, grid_w, compat), theta)
    cos_h, sin_h = _axis_freqs(half, _grid_positions(top, bottom, grid_h, compat), theta)

    def combine(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        w = w[None, :, :].expand(grid_h, grid_w, half)
        h = h[:, None, :].expand(grid_h, grid_w, half)
        return torch.cat([w, h], dim=-1).reshape(grid_h * grid_w, head_dim)

    return combine(cos_w, cos_h).to(device), combine(sin_w, sin_h).to(device)


def temporal_table(dim: int, length: int = TIME_TABLE_LENGTH) -> torch.Tensor:
    """Fixed sinusoidal table [1, length, dim]: even channels sin(pos * w_i), odd channels cos (float32)."""
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    table = torch.zeros(1, length, dim)
    table[0, :, 0::2] = torch.sin(position * div_term)
    table[0, :, 1::2] = torch.cos(position * div_term)
    return table


class TemporalPositionEncoding(nn.Module):
    """Adds the fixed sinusoidal table along the frame axis (buffer ``pe``, stored in official checkpoints)."""

    def __init__(self, dim: int, dtype=None, device=None, length: int = TIME_TABLE_LENGTH):
        super().__init__()
        self.register_buffer("pe", torch.empty(1, length, dim, dtype=dtype, device=device))
        if self.pe.device.type != "meta":
            self.pe.copy_(temporal_table(dim, length))

    def check_frames(self, frames: int) -> None:
        """Raise when ``frames`` latent frames are more than the table holds."""
        if frames > self.pe.shape[1]:
            raise ValueError(f"{frames} latent frames exceed the {self.pe.shape[1]}-frame temporal table")

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x [B, F*hw, D] -> x + pe[frame] for every token of each frame."""
        self.check_frames(frames)
        b, n, d = x.shape
        pe = cast_param(self.pe[0, :frames], x)  # [F, D]
        return (x.view(b, frames, n // frames, d) + pe[None, :, None, :]).view(b, n, d)


# --------------------------------------------------------------------------------------------------
# Conditioning embeddings
# --------------------------------------------------------------------------------------------------


def silu_fp32(x: torch.Tensor) -> torch.Tensor:
    """SiLU computed in float32, returned in x's dtype (the official FP32SiLU)."""
    return F.silu(x.float()).to(x.dtype)


class TextProjectionV4(nn.Module):
    """Linear -> fp32 SiLU -> Linear (PixArt-style projection; keys ``linear_1``, ``linear_2``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.linear_1 = operations.Linear(in_dim, hidden, dtype=dtype, device=device)
        self.linear_2 = operations.Linear(hidden, out_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(silu_fp32(self.linear_1(x)))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, heads*d] -> [B, heads, L, d]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, d] -> [B, L, heads*d]."""
    return x.transpose(1, 2).flatten(2)


class AttentionPool(nn.Module):
    """One query (the mean token) attending over [mean ; tokens] + a learned position table -> [B, out_dim]."""

    def __init__(self, seq_len: int, dim: int, heads: int, out_dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(seq_len + 1, dim, dtype=dtype, device=device))
        self.k_proj = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.q_proj = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.v_proj = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.c_proj = operations.Linear(dim, out_dim, dtype=dtype, device=device)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1+S, dim]
        x = x + cast_param(self.positional_embedding, x)[None]
        q = split_heads(self.q_proj(x[:, :1]), self.heads)
        k, v = split_heads(self.k_proj(x), self.heads), split_heads(self.v_proj(x), self.heads)
        return self.c_proj(merge_heads(attention(q, k, v)))[:, 0]


class ConditioningEmbedding(nn.Module):
    """temb [B, D] = MLP(sinusoid(t)) + MLP([pooled mT5 ; sinusoids of the 6 image-size numbers ; style])."""

    def __init__(self, cfg: TransformerV4Config, dtype=None, device=None, operations=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device, "operations": operations}
        dim = cfg.inner_dim
        self.timestep_embedder = TimestepEmbedding(META_EMBED_DIM, dim, **kw)
        self.pooler = AttentionPool(
            cfg.text_len_t5, cfg.cross_attention_dim_t5, POOLER_HEADS, cfg.pooled_projection_dim, **kw
        )
        self.style_embedder = operations.Embedding(1, dim, dtype=dtype, device=device)
        extra_dim = META_EMBED_DIM * 6 + dim + cfg.pooled_projection_dim
        self.extra_embedder = TextProjectionV4(extra_dim, 4 * dim, dim, **kw)

    def forward(self, timestep: torch.Tensor, t5_states: torch.Tensor, image_meta_size: torch.Tensor, style):
        dtype = timestep.dtype
        temb = self.timestep_embedder(timestep_sinusoid(timestep, META_EMBED_DIM).to(dtype))
        pooled = self.pooler(t5_states)
        meta = timestep_sinusoid(image_meta_size.reshape(-1), META_EMBED_DIM).to(dtype).view(-1, 6 * META_EMBED_DIM)
        extra = torch.cat([pooled, meta, self.style_embedder(style)], dim=1)
        return temb + self.extra_embedder(extra)


class PackedAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (packed ``in_proj_*``, ``out_proj``), computed by our attention."""

    def __init__(self, dim: int, heads: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, dtype=dtype, device=device))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, dtype=dtype, device=device))
        self.out_proj = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.heads = heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Batch-first [B, L, dim] inputs -> [B, Lq, dim]."""
        w_q, w_k, w_v = cast_param(self.in_proj_weight, query).chunk(3)
        b_q, b_k, b_v = cast_param(self.in_proj_bias, query).chunk(3)
        q = split_heads(F.linear(query, w_q, b_q), self.heads)
        k = split_heads(F.linear(key, w_k, b_k), self.heads)
        v = split_heads(F.linear(value, w_v, b_v), self.heads)
        return self.out_proj(merge_heads(attention(q, k, v)))


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table [grid*grid, dim] (MAE style): first half encodes the column, second the row."""
    coords = torch.arange(grid, dtype=torch.float32)
    cols, rows = torch.meshgrid(coords, coords, indexing="xy")

    def sincos_1d(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim / 4))
        angles = torch.outer(pos.flatten(), omega)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([sincos_1d(cols), sincos_1d(rows)], dim=1)


def resize_square_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """A [g*g, C] table laid out on a g x g grid, bicubically resized to [length, C] (length a square)."""
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(length)
    if tgt * tgt != length:
        raise ValueError(f"{length} image tokens do not form a square grid; expected a CLIP ViT patch grid")
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class ClipResampler(nn.Module):
    """Perceiver resampler: n_query learned queries attend once over the CLIP patch tokens -> [B, n_query, dim]."""

    def __init__(self, n_query: int, dim: int, kv_dim: int, heads: int, dtype=None, device=None, operations=None):
        super().__init__()
        if math.isqrt(n_query) ** 2 != n_query:
            raise ValueError(f"n_query must be a square number (the resampler's query grid), got {n_query}")
        # Fixed 2-D sin-cos positions of the query grid, stored as a (frozen) parameter in the checkpoints.
        self.pos_embed = nn.Parameter(torch.empty(n_query, dim, dtype=dtype, device=device), requires_grad=False)
        self.query = nn.Parameter(torch.empty(n_query, dim, dtype=dtype, device=device))
        self.kv_proj = operations.Linear(kv_dim, dim, bias=False, dtype=dtype, device=device) if kv_dim != dim else None
        self.attn = PackedAttention(dim, heads, dtype=dtype, device=device, operations=operations)
        # Plain LayerNorms (eps 1e-5), unlike the fp32 1e-6 norms of the blocks (spec §10.5).
        self.ln_q = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.ln_kv = operations.LayerNorm(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key_pos = resize_square_table(cast_param(self.pos_embed, x), x.shape[1])  # [L, dim]
        kv = self.ln_kv(self.kv_proj(x) if self.kv_proj is not None else x)
        query = self.ln_q(cast_param(self.query, kv)) + cast_param(self.pos_embed, kv)
        return self.attn(query[None].expand(x.shape[0], -1, -1), kv + key_pos, kv)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class HunyuanAttention(nn.Module):
    """Self- or cross-attention with per-head LayerNorm on q and k and optional 2-D RoPE.

    RoPE rotates q and k in self-attention but only q in cross-attention (the key is text or image).
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dtype=None, device=None, operations=None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        head_dim = dim // heads
        self.to_q = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.to_k = operations.Linear(kv_dim, dim, dtype=dtype, device=device)
        self.to_v = operations.Linear(kv_dim, dim, dtype=dtype, device=device)
        self.norm_q = operations.LayerNorm(head_dim, eps=1e-6, dtype=dtype, device=device)
        self.norm_k = operations.LayerNorm(head_dim, eps=1e-6, dtype=dtype, device=device)
        # A list so the checkpoint key is `to_out.0.*` (slot 1 was a dropout).
        self.to_out = nn.ModuleList([operations.Linear(dim, dim, dtype=dtype, device=device)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        """x [B, N, D], context [B, S, kv_dim] (None: self-attention), rope (cos, sin) [N, head_dim] or None."""
        source = x if context is None else context
        q = self.norm_q(split_heads(self.to_q(x), self.heads))
        k = self.norm_k(split_heads(self.to_k(source), self.heads))
        v = split_heads(self.to_v(source), self.heads)
        if rope is not None:
            q = apply_rope(q, *rope)
            if context is None:
                k = apply_rope(k, *rope)
        return self.to_out[0](merge_heads(attention(q, k, v)))


class AdaLayerNormShift(nn.Module):
    """fp32 LayerNorm plus a shift from the conditioning vector (no scale, no gate)."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None, operations=None):
        super().__init__()
        self.linear = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(dim, eps=eps, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift = self.linear(silu_fp32(temb))
        return layer_norm_fp32(self.norm, x) + shift[:, None, :]


def fp32_layer_norm(dim: int, eps: float, dtype=None, device=None, operations=None) -> nn.Module:
    """An affine LayerNorm (the official FP32LayerNorm): its call sites normalise through ``layer_norm_fp32``."""
    return operations.LayerNorm(dim, eps=eps, dtype=dtype, device=device)


class GatedClipOutput(nn.Module):
    """GEGLU gate of the CLIP branch: fp32 LayerNorm with eps = dim (an official slip), Linear, x * GELU(g)."""

    def __init__(self, dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        # The official constructor passes the width where eps belongs; the trained weights expect that norm.
        self.norm = operations.LayerNorm(dim, eps=float(dim), dtype=dtype, device=device)
        self.proj = operations.Linear(dim, 2 * dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(layer_norm_fp32(self.norm, x)).chunk(2, dim=-1)
        return value * F.gelu(gate)


class HunyuanDiTBlock(nn.Module):
    """One V4 block: [long skip] -> + temporal table -> self-attn -> text cross-attn -> [CLIP cross-attn] -> FFN."""

    def __init__(self, cfg: TransformerV4Config, skip: bool, dtype=None, device=None, operations=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device, "operations": operations}
        dim, heads, eps = cfg.inner_dim, cfg.num_attention_heads, cfg.norm_eps
        self.norm1 = AdaLayerNormShift(dim, eps, **kw)
        self.t_embed = TemporalPositionEncoding(dim, dtype=dtype, device=device) if cfg.time_position_encoding else None
        self.attn1 = HunyuanAttention(dim, heads, **kw)
        self.norm2 = fp32_layer_norm(dim, eps, **kw)
        self.attn2 = HunyuanAttention(dim, heads, cfg.cross_attention_dim, **kw)
        self.norm_clip = self.attn_clip = self.gate_clip = self.norm_clip_out = None
        if cfg.has_clip:
            self.norm_clip = fp32_layer_norm(dim, eps, **kw)
            self.attn_clip = HunyuanAttention(dim, heads, cfg.cross_attention_dim, **kw)
            self.gate_clip = GatedClipOutput(dim, **kw)
            self.norm_clip_out = fp32_layer_norm(dim, eps, **kw)
        self.norm3 = fp32_layer_norm(dim, eps, **kw)
        self.ff = FeedForward(dim, cfg.ff_dim, **kw)
        self.norm4 = fp32_layer_norm(dim, eps, **kw) if cfg.after_norm else None
        self.skip_norm = self.skip_linear = None
        if skip:
            self.skip_norm = fp32_layer_norm(2 * dim, eps, **kw)
            self.skip_linear = operations.Linear(2 * dim, dim, dtype=dtype, device=device)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        frames: int,
        clip: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
        rope_in_self_attention: bool = True,
    ) -> torch.Tensor:
        """x [B, N, D], text [B, S, Dtxt], temb [B, D], rope for all N tokens, clip [B, Q, Dtxt] -> [B, N, D]."""
        if self.skip_linear is not None:
            x = self.skip_linear(layer_norm_fp32(self.skip_norm, torch.cat([x, skip], dim=-1)))
        if frames != 1 and self.t_embed is not None:
            x = self.t_embed(x, frames)
        x = fp16_safe(x + self.attn1(self.norm1(x, temb), rope=rope if rope_in_self_attention else None))
        x = fp16_safe(x + self.attn2(layer_norm_fp32(self.norm2, x), text, rope))
        if self.attn_clip is not None:
            gated = self.gate_clip(self.attn_clip(layer_norm_fp32(self.norm_clip, x), clip, rope))
            x = fp16_safe(x + layer_norm_fp32(self.norm_clip_out, gated))
        ff = fp16_safe(self.ff(layer_norm_fp32(self.norm3, x)))
        if self.norm4 is not None:
            ff = layer_norm_fp32(self.norm4, ff)
        return fp16_safe(x + ff)


class AdaLayerNormContinuous(nn.Module):
    """Final adaLN: LayerNorm without affine, modulated by (scale, shift) -- scale first -- from temb."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None, operations=None):
        super().__init__()
        self.linear = operations.Linear(dim, 2 * dim, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb.float()).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class PatchEmbed(nn.Module):
    """2x2 patch conv per frame (key ``proj``)."""

    def __init__(self, in_channels: int, dim: int, patch: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.proj = operations.Conv2d(in_channels, dim, kernel_size=patch, stride=patch, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, F*(H/p)*(W/p), D], tokens ordered (frame, row, column)."""
        b, _, f = x.shape[:3]
        x = self.proj(x.transpose(1, 2).flatten(0, 1))  # [B*F, D, h, w]
        return x.unflatten(0, (b, f)).flatten(3).transpose(2, 3).flatten(1, 2)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class EasyAnimateV4Transformer3D(nn.Module):
    """The V4 denoiser: latents [B, 4, F, H, W] + conditioning -> [B, 8, F, H, W] (v-prediction ; variance)."""

    version = "V4"

    def __init__(
        self,
        config: TransformerV4Config | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations=None,
        **overrides,
    ):
        super().__init__()
        config = (config or V4_XL).replace(**overrides)
        if config.compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {config.compat!r}")
        if config.num_layers % 2:
            raise ValueError(f"num_layers must be even (long skips pair the halves), got {config.num_layers}")
        self.config = config
        self.dtype = dtype or torch.float32
        operations = operations or default_operations
        kw = {"dtype": dtype, "device": device, "operations": operations}
        dim, text_dim = config.inner_dim, config.cross_attention_dim

        self.text_embedder = TextProjectionV4(
            config.cross_attention_dim_t5, 4 * config.cross_attention_dim_t5, text_dim, **kw
        )
        self.text_embedding_padding = nn.Parameter(
            torch.empty(config.text_len + config.text_len_t5, text_dim, dtype=dtype, device=device)
        )
        self.pos_embed = PatchEmbed(config.in_channels, dim, config.patch_size, **kw)
        self.time_extra_emb = ConditioningEmbedding(config, **kw)
        _, pops = config.skip_layers
        self.blocks = nn.ModuleList(HunyuanDiTBlock(config, skip=i in pops, **kw) for i in range(config.num_layers))
        self.clip_padding = self.clip_projection = None
        if config.has_clip:
            self.clip_padding = nn.Parameter(torch.empty(config.n_query, text_dim, dtype=dtype, device=device))
            self.clip_projection = ClipResampler(
                config.n_query, text_dim, config.projection_dim, config.num_attention_heads, **kw
            )
        self.norm_out = AdaLayerNormContinuous(dim, 1e-6, **kw)
        self.proj_out = operations.Linear(dim, config.patch_size**2 * config.out_channels, dtype=dtype, device=device)
        self.gradient_checkpointing = False
        if self.text_embedding_padding.device.type != "meta":
            self.init_raw_parameters()

    @torch.no_grad()
    def init_raw_parameters(self) -> None:
        """The official initial values of the parameters no layer initialises (loaders overwrite them all)."""
        self.text_embedding_padding.normal_()
        pool = self.time_extra_emb.pooler
        pool.positional_embedding.normal_(std=pool.positional_embedding.shape[1] ** -0.5)
        if self.clip_projection is not None:
            resampler = self.clip_projection
            self.clip_padding.normal_(std=0.02)
            resampler.query.normal_(std=0.02)
            n, dim = resampler.pos_embed.shape
            resampler.pos_embed.copy_(sincos_2d(dim, math.isqrt(n)))
            nn.init.xavier_uniform_(resampler.attn.in_proj_weight)
            nn.init.zeros_(resampler.attn.in_proj_bias)

    # ---- state dict ------------------------------------------------------------------------------

    def derived_tensor(self, key: str) -> torch.Tensor | None:
        """The value of a deterministic buffer a checkpoint may omit (``blocks.N.t_embed.pe``), else None."""
        if key.startswith("blocks.") and key.endswith(".t_embed.pe") and self.config.time_position_encoding:
            return temporal_table(self.config.inner_dim)
        return None

    # ---- inputs ----------------------------------------------------------------------------------

    def validate_inputs(self, hidden_states, text, text_mask, t5, t5_mask, inpaint_latents, clip, clip_mask) -> None:
        """Raise ValueError naming the rule before any compute."""
        cfg = self.config
        if hidden_states.ndim != 5:
            raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(hidden_states.shape)}")
        b, c, _f, h, w = hidden_states.shape
        if c != cfg.latent_channels:
            raise ValueError(f"latents have {c} channels; this V4 model denoises {cfg.latent_channels}-channel latents")
        p = cfg.patch_size
        for name, size in (("height", h), ("width", w)):
            if size % p:
                raise ValueError(
                    f"latent {name} {size} is not divisible by the patch size {p} "
                    f"(pixel {name} must be a multiple of {VAE_SPATIAL * p})"
                )
        if cfg.inpaint_channels:
            if inpaint_latents is None:
                raise ValueError(
                    f"this V4 InP model needs inpaint_latents [B, {cfg.inpaint_channels}, F, H, W] "
                    "(all zeros for text-to-video)"
                )
            if inpaint_latents.shape != (b, cfg.inpaint_channels, *hidden_states.shape[2:]):
                raise ValueError(
                    f"inpaint_latents shape {tuple(inpaint_latents.shape)} does not match latents "
                    f"{tuple(hidden_states.shape)} with {cfg.inpaint_channels} channels"
                )
        elif inpaint_latents is not None:
            raise ValueError("this V4 model is text-to-video only; pass inpaint_latents=None")
        for name, states, mask, length, width in (
            ("encoder_hidden_states (BERT)", text, text_mask, cfg.text_len, cfg.cross_attention_dim),
            ("encoder_hidden_states_t5 (mT5)", t5, t5_mask, cfg.text_len_t5, cfg.cross_attention_dim_t5),
        ):
            if states is None or states.ndim != 3 or states.shape[0] != b:
                raise ValueError(f"{name} must be [B={b}, {length}, {width}]")
            if tuple(states.shape[1:]) != (length, width):
                raise ValueError(
                    f"{name} has shape {tuple(states.shape)}; this model takes [B, {length}, {width}] "
                    "(pad the tokens to that length and encode with the model's own text encoder)"
                )
            if mask is not None and tuple(mask.shape) != (b, length):
                raise ValueError(f"the mask of {name} has shape {tuple(mask.shape)}; expected [{b}, {length}]")
        if clip is not None:
            if not cfg.has_clip:
                raise ValueError("this V4 model has no CLIP image branch; pass clip_encoder_hidden_states=None")
            if clip.ndim != 3 or clip.shape[0] != b or clip.shape[-1] != cfg.projection_dim:
                raise ValueError(
                    f"clip_encoder_hidden_states has shape {tuple(clip.shape)}; expected [B, L, {cfg.projection_dim}] "
                    "(CLIP vision last_hidden_state without the CLS token)"
                )
        if clip_mask is not None and tuple(clip_mask.shape) != (b, cfg.n_query):
            raise ValueError(f"clip_attention_mask has shape {tuple(clip_mask.shape)}; expected [{b}, {cfg.n_query}]")

    def rope(self, grid_h: int, grid_w: int, frames: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2-D rotary table of one frame, tiled over ``frames``: (cos, sin) each [F*h*w, head_dim]."""
        cfg = self.config
        base = ROPE_BASE_PIXELS // VAE_SPATIAL // cfg.patch_size
        cos, sin = rope_2d(grid_h, grid_w, cfg.attention_head_dim, base, cfg.compat, device=device)
        return cos.repeat(frames, 1), sin.repeat(frames, 1)

    def text_tokens(self, text, text_mask, t5, t5_mask) -> torch.Tensor:
        """[BERT ; projected mT5] with padding positions (mask 0) replaced by the learned table -> [B, S, Dtxt]."""
        tokens = torch.cat([text, self.text_embedder(t5)], dim=1)
        masks = [
            m if m is not None else torch.ones(s.shape[:2], device=s.device)
            for m, s in ((text_mask, text), (t5_mask, t5))
        ]
        keep = torch.cat(masks, dim=1).to(tokens.device).bool()[:, :, None]
        return torch.where(keep, tokens, cast_param(self.text_embedding_padding, tokens))

    def clip_tokens(self, clip: torch.Tensor | None, clip_mask: torch.Tensor | None, b: int, like: torch.Tensor):
        """Resampled image tokens, the learned padding where the mask is 0 (everywhere without an image)."""
        padding = cast_param(self.clip_padding, like)
        if clip is None or (clip_mask is not None and not bool(clip_mask.bool().any())):
            # The official pipeline feeds zero features with mask 0; the padding replaces every token then.
            return padding[None].expand(b, -1, -1)
        tokens = self.clip_projection(clip.to(like.dtype))
        if clip_mask is None:
            return tokens
        return torch.where(clip_mask.to(tokens.device).bool()[:, :, None], tokens, padding)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_t5: torch.Tensor,
        text_embedding_mask: torch.Tensor | None = None,
        text_embedding_mask_t5: torch.Tensor | None = None,
        inpaint_latents: torch.Tensor | None = None,
        clip_encoder_hidden_states: torch.Tensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        image_meta_size: torch.Tensor | None = None,
        style: torch.Tensor | None = None,
        step_cache=None,
    ) -> torch.Tensor:
        """Predict [v ; variance] for latents at ``timestep`` [B] in [0, 1000).

        ``step_cache``: ``StepCache.for_call(...)`` (step_cache.py): may skip the blocks, reusing their last residual.

        Text masks default to all ones; ``image_meta_size`` [B, 6] to the official [1024, 1024, H, W, 0, 0]
        in pixels; ``style`` to 0. Without CLIP features (text-to-video, or the first 60 % of the official
        image-to-video steps) the image tokens are the learned padding.
        """
        self.validate_inputs(
            hidden_states,
            encoder_hidden_states,
            text_embedding_mask,
            encoder_hidden_states_t5,
            text_embedding_mask_t5,
            inpaint_latents,
            clip_encoder_hidden_states,
            clip_attention_mask,
        )
        cfg = self.config
        b, _c, f, h, w = hidden_states.shape
        p = cfg.patch_size
        gh, gw = h // p, w // p
        dtype, device = hidden_states.dtype, hidden_states.device
        # The official pipeline casts the timestep to the latent dtype (in bf16, 999 becomes 1000).
        timestep = timestep.to(device, dtype).expand(b) if timestep.ndim == 0 else timestep.to(device, dtype)
        if image_meta_size is None:
            meta = [*ORIGINAL_SIZE, h * VAE_SPATIAL, w * VAE_SPATIAL, 0, 0]
            image_meta_size = torch.tensor([meta], device=device).expand(b, 6)
        if style is None:
            style = torch.zeros(b, dtype=torch.long, device=device)

        x = hidden_states if inpaint_latents is None else torch.cat([hidden_states, inpaint_latents.to(dtype)], 1)
        x = self.pos_embed(x)  # [B, N, D]
        t5 = encoder_hidden_states_t5.to(dtype)
        temb = self.time_extra_emb(timestep, t5, image_meta_size.to(device, dtype), style.to(device))
        text = self.text_tokens(encoder_hidden_states.to(dtype), text_embedding_mask, t5, text_embedding_mask_t5)
        clip = self.clip_tokens(clip_encoder_hidden_states, clip_attention_mask, b, text) if cfg.has_clip else None
        rope = self.rope(gh, gw, f, device)

        pushes, pops = cfg.skip_layers

        def run_blocks(x: torch.Tensor) -> torch.Tensor:
            skips = []
            for i, block in enumerate(self.blocks):
                skip = skips.pop() if i in pops else None
                args = (x, text, temb, rope, f, clip, skip, cfg.rope_in_first_block or i > 0)
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, *args, use_reentrant=False)
                else:
                    x = block(*args)
                if i in pushes:
                    skips.append(x)
            return x

        if step_cache is None:
            x = run_blocks(x)
        else:  # TeaCache's signal: the first block's timestep-shifted input
            x = step_cache(self.blocks[0].norm1(x, temb), x, run_blocks)

        x = self.proj_out(self.norm_out(x, temb))  # [B, N, p*p*C], last axis laid out (p_h, p_w, c)
        x = x.reshape(b, f, gh, gw, p, p, cfg.out_channels)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, cfg.out_channels, f, h, w)
