"""EasyAnimate V1 / V2 / V3 transformer: PixArt-alpha DiT blocks with T5 text and AnimateDiff-style motion modules.

One file for the PixArt-motion family; the variants differ only in their configuration (docs/v1_v3.md).
Layer names follow the official ``Transformer3DModel`` checkpoints (easyanimate/models/transformer3d.py at
f9eeabe), so a released ``transformer/`` folder loads without renaming.

Shapes: B batch, C latent channels (4), F latent frames, H/W latent height/width, p patch size (2),
h = H/p, w = W/p, N = F*h*w video tokens, D = heads*head_dim model width (1152), S text tokens (120 T5
tokens, + 8 CLIP tokens for an InP model given an image).

What the released model does, in order:
* tokens: a pxp patch conv per frame over [latents ; inpaint latents], plus PixArt's fixed 2-D sin-cos table
  of one frame (same for every frame); tokens ordered (frame, row, column).
* conditioning: adaLN-single. One MLP of the timestep sinusoid gives temb [B, D] (plus resolution and
  aspect-ratio embeddings when sample_size == 128); one Linear turns it into the 6 modulations every
  block adds to its own learned ``scale_shift_table``.
* text: T5 states [B, 120, 4096] through Linear -> tanh-GELU -> Linear to D; an InP model appends 8 tokens
  projected from the CLIP image embedding [B, 768]. Padding (mask 0) gets a -10000 additive bias.
* each block: per-frame self-attention (adaLN shift/scale/gate) -> motion module (own residual) ->
  cross-attention (no norm) -> feed-forward (adaLN shift/scale/gate).
* motion module: GroupNorm -> Linear -> [LayerNorm -> attention over frames (or over all tokens, "Global")
  with a sinusoidal frame-position table added to its input] x2 -> LayerNorm -> GEGLU FFN -> Linear, + input.
* U-ViT long skips (V2, V3): outputs of blocks 0..12 are added, through zero-initialised Linears, to the
  inputs of blocks 27..15 (last pushed, first popped).
* output: adaLN-single final norm, Linear to p*p*8 channels (4 predicted noise + 4 learned variance).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention, biased_attention
from .ops import cast_param, default_operations, layer_norm_fp32
from .transformer import FeedForward, TimestepEmbedding, fp16_safe, timestep_sinusoid
from .transformer_v4 import TemporalPositionEncoding, merge_heads, split_heads, temporal_table

UVIT_PUSHES = 13  # blocks 0..12 push their output (hard-coded in the official forward)
UVIT_FIRST_POP = 15  # blocks 15.. pop one (so blocks 13 and 14 neither push nor pop)
TIME_TABLE_LENGTH = 4096  # temporal_position_encoding_max_len of every released motion module
MASK_BIAS = -10000.0  # the official additive bias of a masked text / image token
CLIP_TOKENS = 8  # an InP model's CLIP image embedding becomes 8 text-width tokens
CLIP_EMBED_DIM = 768  # CLIPVisionModelWithProjection(ViT-L/14).image_embeds
SIZE_EMBED_DIM = 256  # sinusoid width of the timestep (and resolution / aspect ratio) embeddings
MOTION_KINDS = ("Temporal", "Global")


@dataclass(frozen=True)
class TransformerV3Config:
    """Hyperparameters of the PixArt-motion transformer. Defaults: EasyAnimateV3-XL-2-InP-512x512."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 12  # 4 noisy latent + 4 mask latent + 4 masked-video latent (V3 InP); 4 for V1 / V2
    out_channels: int = 8  # learned sigma: 4 predicted noise + 4 variance
    num_layers: int = 28
    patch_size: int = 2
    sample_size: int = 64  # latent size the PixArt base was trained at: sets the sin-cos table's scale
    caption_channels: int = 4096  # T5-v1.1-XXL width
    norm_eps: float = 1e-6
    attention_bias: bool = True
    enable_uvit: bool = True
    # Motion modules: attention kinds of the even and of the odd blocks ("Temporal" over frames, "Global"
    # over all F*h*w tokens) and their head counts. V3: even (T, T), odd (T, G); V2 / V1: (T, T) everywhere.
    motion_even: tuple[str, ...] = ("Temporal", "Temporal")
    motion_odd: tuple[str, ...] = ("Temporal", "Global")
    motion_heads_even: int = 16
    motion_heads_odd: int = 16
    motion_layers: int = 1  # num_transformer_block of every motion module
    motion_block_size: int = 1  # V1's "VanillaGrid": temporal attention over (frame x block x block) windows
    temporal_position_encoding: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> TransformerV3Config:
        """Build from the official config.json merged with the yaml's ``transformer_additional_kwargs``.

        Keys the dict lacks take the official ``Transformer3DModel`` defaults where they shape the model
        (enable_uvit False, basic_block_type "motionmodule", motion_module_type "VanillaGrid").
        """
        for key, allowed in (
            ("norm_type", ("ada_norm_single",)),
            ("activation_fn", ("gelu-approximate",)),
            ("basic_block_type", ("motionmodule", "global_motionmodule")),
            ("motion_module_type", ("Vanilla", "VanillaGrid")),
        ):
            if key in d and d[key] not in allowed:
                raise ValueError(f"{key} {d[key]!r} is not supported; the released V1-V3 models use {allowed}")
        for key in ("patch_3d", "fake_3d", "casual_3d", "time_position_encoding_before_transformer", "qk_norm"):
            if d.get(key):
                raise ValueError(f"{key}=True is not supported; no released V1-V3 model uses it")
        if d.get("after_norm"):
            raise ValueError("after_norm=True is not supported; no released V1-V3 model uses it")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        if d.get("caption_channels") is None and "caption_channels" in d:
            raise ValueError("a V1-V3 transformer needs caption_channels (the T5 width)")
        width = kw.get("num_attention_heads", 16) * kw.get("attention_head_dim", 72)
        if d.get("cross_attention_dim") not in (None, width):
            raise ValueError("cross_attention_dim must equal the model width (the caption projection's output)")
        # Absent keys take the official class's defaults (not this dataclass's V3 ones).
        kw["enable_uvit"] = bool(d.get("enable_uvit", False))
        grid = d.get("motion_module_type", "VanillaGrid") == "VanillaGrid"
        if d.get("basic_block_type", "motionmodule") == "global_motionmodule":
            even, odd = d.get("motion_module_kwargs_even"), d.get("motion_module_kwargs_odd")
        else:
            even = odd = d.get("motion_module_kwargs")
        for parity, mk in (("even", even), ("odd", odd)):
            if mk is None:
                continue
            if mk.get("temporal_attention_dim_div", 1) != 1 or mk.get("global_attention"):
                raise ValueError(
                    "motion modules with temporal_attention_dim_div != 1 or global_attention are not supported"
                )
            if mk.get("temporal_position_encoding_max_len", TIME_TABLE_LENGTH) != TIME_TABLE_LENGTH:
                raise ValueError(f"temporal_position_encoding_max_len must be {TIME_TABLE_LENGTH}")
            kinds = tuple(t.split("_")[0] for t in mk.get("attention_block_types", ("Temporal_Self", "Temporal_Self")))
            if any(t.endswith("_Cross") for t in mk.get("attention_block_types", ())) or set(kinds) - set(MOTION_KINDS):
                raise ValueError(f"motion attention_block_types {mk.get('attention_block_types')} are not supported")
            kw[f"motion_{parity}"] = kinds
            kw[f"motion_heads_{parity}"] = mk.get("num_attention_heads", 8)
            kw["motion_layers"] = mk.get("num_transformer_block", 2)
            kw["temporal_position_encoding"] = mk.get("temporal_position_encoding", False)
            kw["motion_block_size"] = mk.get("block_size", 1) if grid else 1
        return cls(**kw)

    def replace(self, **changes) -> TransformerV3Config:
        return dataclasses.replace(self, **changes)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.out_channels // 2  # learned sigma in every released model

    @property
    def inpaint_channels(self) -> int:
        return self.in_channels - self.latent_channels

    @property
    def has_clip(self) -> bool:
        """The official rule: a 12-channel input (InP) model has the CLIP image projection."""
        return self.in_channels == 12

    @property
    def release(self) -> str:
        """The release this configuration belongs to: "V3" (InP or global motion attention), "V2" (U-ViT long
        skips) or "V1"; the rule detection uses where the tensors leave it open."""
        if self.in_channels == 12 or "Global" in self.motion_even + self.motion_odd:
            return "V3"
        return "V2" if self.enable_uvit else "V1"

    @property
    def use_additional_conditions(self) -> bool:
        """PixArt's resolution / aspect-ratio embeddings exist only for sample_size 128 (the 1024 base)."""
        return self.sample_size == 128

    @property
    def skip_layers(self) -> tuple[range, range]:
        """(blocks whose output is pushed for a long skip, blocks that pop one); empty without U-ViT."""
        if not self.enable_uvit:
            return range(0), range(0)
        return range(min(UVIT_PUSHES, self.num_layers)), range(UVIT_FIRST_POP, self.num_layers)


# The released models (docs/v1_v3.md). V3 and V2 share PixArt-XL-2 geometry; only the motion modules,
# the input channels and U-ViT differ.
V3_XL_INP = TransformerV3Config()
V2_XL = TransformerV3Config(
    in_channels=4,
    motion_odd=("Temporal", "Temporal"),
    motion_heads_even=8,
    motion_heads_odd=8,
)
V1_XL = V2_XL.replace(enable_uvit=False, motion_block_size=2)


def config_from_state_dict(shapes: dict[str, tuple], config: dict | None = None) -> TransformerV3Config:
    """The configuration of a V1-V3 checkpoint from its tensor shapes (+ its config.json / yaml where given).

    Shapes give the width, depth, channels, U-ViT, the motion module depth and the additional conditions.
    Head counts and the motion attention kinds are not visible in shapes: without a config they follow the
    release table (12-channel InP -> V3; 4-channel with long skips -> V2; without -> V1).
    """
    if "pos_embed.proj.weight" not in shapes or "adaln_single.linear.weight" not in shapes:
        raise ValueError("not a V1-V3 (PixArt-motion) transformer: no pos_embed.proj / adaln_single keys")
    dim, in_channels, p, _ = shapes["pos_embed.proj.weight"]
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks.")}
    mm = "transformer_blocks.0.attn_temporal.temporal_transformer.transformer_blocks."
    motion_layers = len({k[len(mm) :].split(".")[0] for k in shapes if k.startswith(mm)})
    uvit = any(k.startswith("long_connect_fc.") for k in shapes)
    base = V3_XL_INP if in_channels == 12 else V2_XL if uvit else V1_XL
    head_dim = base.attention_head_dim if dim % base.attention_head_dim == 0 else 72
    found = dict(
        num_attention_heads=dim // head_dim,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=shapes["proj_out.weight"][0] // (p * p),
        num_layers=len(blocks),
        patch_size=p,
        caption_channels=shapes["caption_projection.linear_1.weight"][1],
        attention_bias="transformer_blocks.0.attn1.to_q.bias" in shapes,
        enable_uvit=uvit,
        motion_layers=motion_layers,
        temporal_position_encoding=any(k.endswith("pos_encoder.pe") for k in shapes),
    )
    if "adaln_single.emb.resolution_embedder.linear_1.weight" in shapes:
        found["sample_size"] = 128
    if config:  # the config gives heads and motion layout; the shapes win for everything they show
        base = TransformerV3Config.from_dict(config)
        found["num_attention_heads"] = dim // base.attention_head_dim
        found["attention_head_dim"] = base.attention_head_dim
    return base.replace(**found)


# --------------------------------------------------------------------------------------------------
# Position tables
# --------------------------------------------------------------------------------------------------


def sincos_2d_pixart(dim: int, grid_h: int, grid_w: int, base_size: int, scale: float) -> torch.Tensor:
    """PixArt's fixed 2-D table [h*w, dim] (float32), tokens row-major: first half the column, second the row.

    Positions are stretched so that any grid spans ``base_size`` units, then divided by ``scale``;
    frequencies are computed in float64 as diffusers does.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs a width divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float32) / (grid_h / base_size) / scale
    cols = torch.arange(grid_w, dtype=torch.float32) / (grid_w / base_size) / scale
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def sincos(pos: torch.Tensor) -> torch.Tensor:  # [h*w] -> [h*w, dim/2]
        angles = torch.outer(pos.double(), omega)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    col_pos = cols[None, :].expand(grid_h, grid_w).reshape(-1)
    row_pos = rows[:, None].expand(grid_h, grid_w).reshape(-1)
    return torch.cat([sincos(col_pos), sincos(row_pos)], dim=1).float()


class FrameTable(TemporalPositionEncoding):
    """V4's fixed sinusoidal frame-position table at the motion modules' 4096 rows (buffer ``pe``, stored in official
    checkpoints), added to sequences laid out frame-major per spatial position."""

    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__(dim, dtype, device, length=TIME_TABLE_LENGTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, F, dim] -> x + pe[:F]."""
        self.check_frames(x.shape[1])
        return x + cast_param(self.pe[:, : x.shape[1]], x)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Attention with a key mask [B, S] (True = keep), given as the official additive -10000 bias.

    Not a hard mask: where scores spread over more than ~10^4 a "masked" key still counts, and a row whose keys
    are all masked attends to all of them uniformly, exactly as the official model does.
    """
    if keep is None or bool(keep.all()):
        return attention(q, k, v)
    bias = (~keep.bool()).to(q.dtype)[:, None, None, :] * MASK_BIAS  # [B, 1, 1, S]
    return biased_attention(q, k, v, bias)


class Attention(nn.Module):
    """diffusers' ``Attention`` parameters (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), through our attention."""

    def __init__(self, dim: int, heads: int, kv_dim=None, bias=False, dtype=None, device=None, operations=None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.to_q = operations.Linear(dim, dim, bias=bias, dtype=dtype, device=device)
        self.to_k = operations.Linear(kv_dim, dim, bias=bias, dtype=dtype, device=device)
        self.to_v = operations.Linear(kv_dim, dim, bias=bias, dtype=dtype, device=device)
        # A list so the checkpoint key is `to_out.0.*` (slot 1 was a dropout).
        self.to_out = nn.ModuleList([operations.Linear(dim, dim, dtype=dtype, device=device)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, keep=None) -> torch.Tensor:
        """x [B, L, dim], context [B, S, kv_dim] (None: self-attention), keep [B, S] bool -> [B, L, dim]."""
        source = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)
        k, v = split_heads(self.to_k(source), self.heads), split_heads(self.to_v(source), self.heads)
        return self.to_out[0](merge_heads(masked_attention(q, k, v, keep)))


class MotionAttention(Attention):
    """One motion-module attention: frame positions added to its input, then attention over frames
    ("Temporal": each spatial token - or block x block window - separately) or over all tokens ("Global")."""

    def __init__(self, dim, heads, kind, block_size, position_table, dtype=None, device=None, operations=None):
        super().__init__(dim, heads, dtype=dtype, device=device, operations=operations)
        self.kind, self.block_size = kind, block_size
        self.pos_encoder = FrameTable(dim, dtype=dtype, device=device) if position_table else None

    def forward(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """x [B*F, h*w, dim] (one row of tokens per frame) -> same shape."""
        bf, d, c = x.shape
        b = bf // frames
        x = x.view(b, frames, d, c).transpose(1, 2).reshape(b * d, frames, c)  # [B*hw, F, dim]
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        if self.kind == "Global":
            x = x.view(b, d, frames, c).transpose(1, 2).reshape(b, frames * d, c)  # [B, F*hw, dim]
            return super().forward(x).view(b, frames, d, c).reshape(bf, d, c)
        n = self.block_size
        if n == 1:
            out = super().forward(x)  # [B*hw, F, dim]
            return out.view(b, d, frames, c).transpose(1, 2).reshape(bf, d, c)
        # VanillaGrid: windows of n x n tokens attend across frames together: [B*(h/n)*(w/n), F*n*n, dim]
        hb, wb = height // n, width // n
        x = x.view(b, hb, n, wb, n, frames, c).permute(0, 1, 3, 5, 2, 4, 6).reshape(b * hb * wb, frames * n * n, c)
        out = super().forward(x)
        # Back to [(B F n m), (h w)] windows-last, then to one row of tokens per frame.
        out = out.view(b, hb * wb, frames * n * n, c).transpose(1, 2).reshape(b * frames * n * n, hb * wb, c)
        out = out.view(b * frames, n, n, hb, wb, c).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(bf, d, c)


class GEGLUFeedForward(nn.Module):
    """Linear to 2 x 4dim -> value * GELU(gate) -> Linear (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        proj_in = nn.Module()
        proj_in.proj = operations.Linear(dim, 8 * dim, dtype=dtype, device=device)
        self.net = nn.ModuleList([proj_in, nn.Identity(), operations.Linear(4 * dim, dim, dtype=dtype, device=device)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.net[0].proj(x).chunk(2, dim=-1)
        return self.net[2](value * F.gelu(gate))


class MotionLayer(nn.Module):
    """[fp32 LayerNorm -> MotionAttention -> + x] per attention kind, then fp32 LayerNorm -> GEGLU FFN -> + x."""

    def __init__(self, dim, heads, kinds, block_size, position_table, dtype=None, device=None, operations=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device, "operations": operations}
        self.attention_blocks = nn.ModuleList(
            MotionAttention(dim, heads, kind, block_size, position_table, **kw) for kind in kinds
        )
        self.norms = nn.ModuleList(operations.LayerNorm(dim, dtype=dtype, device=device) for _ in kinds)
        self.ff = GEGLUFeedForward(dim, **kw)
        self.ff_norm = operations.LayerNorm(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attn(layer_norm_fp32(norm, x), frames, height, width) + x
        return self.ff(layer_norm_fp32(self.ff_norm, x)) + x


class TemporalTransformer(nn.Module):
    """The motion module body: GroupNorm(32) -> Linear -> MotionLayers -> Linear, plus the input (its own residual)."""

    def __init__(self, dim, heads, kinds, layers, block_size, position_table, dtype=None, device=None, operations=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device, "operations": operations}
        self.norm = operations.GroupNorm(32, dim, eps=1e-6, affine=True, dtype=dtype, device=device)
        self.proj_in = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.transformer_blocks = nn.ModuleList(
            MotionLayer(dim, heads, kinds, block_size, position_table, **kw) for _ in range(layers)
        )
        self.proj_out = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """x [B, F*h*w, D] -> [B, F*h*w, D]."""
        b, n, c = x.shape
        per_frame = x.reshape(b * frames, height * width, c)  # [B*F, hw, D]
        # GroupNorm over channels of each frame's image, in the model dtype (a plain nn.GroupNorm upstream)
        h = self.norm(per_frame.transpose(1, 2).reshape(b * frames, c, height, width))
        h = self.proj_in(h.flatten(2).transpose(1, 2))
        for layer in self.transformer_blocks:
            h = layer(h, frames, height, width)
        return (self.proj_out(h) + per_frame).reshape(b, n, c)


class MotionModule(nn.Module):
    """``VanillaTemporalModule``: a container so the keys read ``attn_temporal.temporal_transformer.*``."""

    def __init__(self, dim, heads, kinds, layers, block_size, position_table, dtype=None, device=None, operations=None):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(
            dim, heads, kinds, layers, block_size, position_table, dtype=dtype, device=device, operations=operations
        )

    def forward(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        return self.temporal_transformer(x, frames, height, width)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class PixArtMotionBlock(nn.Module):
    """One block: adaLN per-frame self-attn -> motion module -> text cross-attn -> adaLN FFN."""

    def __init__(self, cfg: TransformerV3Config, index: int, dtype=None, device=None, operations=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device, "operations": operations}
        dim, heads = cfg.inner_dim, cfg.num_attention_heads
        self.eps = cfg.norm_eps
        self.attn1 = Attention(dim, heads, bias=cfg.attention_bias, **kw)
        odd = index % 2 == 1
        self.attn_temporal = MotionModule(
            dim,
            cfg.motion_heads_odd if odd else cfg.motion_heads_even,
            cfg.motion_odd if odd else cfg.motion_even,
            cfg.motion_layers,
            cfg.motion_block_size,
            cfg.temporal_position_encoding,
            **kw,
        )
        self.attn2 = Attention(dim, heads, dim, bias=cfg.attention_bias, **kw)
        self.ff = FeedForward(dim, 4 * dim, **kw)
        # shift, scale, gate of the attention; shift, scale, gate of the FFN (added to the adaLN-single output)
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim, dtype=dtype, device=device))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks' fp32 LayerNorm without affine parameters."""
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)

    def forward(self, x, text, keep, modulation, frames: int, height: int, width: int) -> torch.Tensor:
        """x [B, N, D], text [B, S, D], keep [B, S] bool or None, modulation [B, 6*D] -> [B, N, D]."""
        b, n, c = x.shape
        mods = cast_param(self.scale_shift_table, x)[None] + modulation.view(b, 6, c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)  # each [B, 1, D]
        h = self.norm(x) * (1 + scale_msa) + shift_msa
        h = self.attn1(h.reshape(b * frames, n // frames, c)).reshape(b, n, c)  # attention within each frame
        x = fp16_safe(gate_msa * h + x)
        x = fp16_safe(self.attn_temporal(x, frames, height, width))
        x = fp16_safe(self.attn2(x, text, keep) + x)
        h = self.norm(x) * (1 + scale_mlp) + shift_mlp
        return fp16_safe(gate_mlp * fp16_safe(self.ff(h)) + x)


class AdaLayerNormSingle(nn.Module):
    """temb [B, D] = MLP(timestep sinusoid) (+ resolution / aspect-ratio MLPs); modulation = Linear(SiLU(temb))."""

    def __init__(self, dim: int, additional: bool, dtype=None, device=None, operations=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device, "operations": operations}
        self.emb = nn.Module()
        self.emb.timestep_embedder = TimestepEmbedding(SIZE_EMBED_DIM, dim, **kw)
        self.additional = additional
        if additional:
            self.emb.resolution_embedder = TimestepEmbedding(SIZE_EMBED_DIM, dim // 3, **kw)
            self.emb.aspect_ratio_embedder = TimestepEmbedding(SIZE_EMBED_DIM, dim // 3, **kw)
        self.linear = operations.Linear(dim, 6 * dim, dtype=dtype, device=device)

    def forward(self, timestep, resolution, aspect_ratio, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [B] -> (modulation [B, 6*D], temb [B, D])."""
        temb = self.emb.timestep_embedder(timestep_sinusoid(timestep, SIZE_EMBED_DIM).to(dtype))
        if self.additional:
            b = timestep.shape[0]
            res = self.emb.resolution_embedder(timestep_sinusoid(resolution.flatten(), SIZE_EMBED_DIM).to(dtype))
            ar = self.emb.aspect_ratio_embedder(timestep_sinusoid(aspect_ratio.flatten(), SIZE_EMBED_DIM).to(dtype))
            temb = temb + torch.cat([res.reshape(b, -1), ar.reshape(b, -1)], dim=1)
        return self.linear(F.silu(temb)), temb


class TwoLayerProjection(nn.Module):
    """Linear -> tanh-GELU -> Linear (keys ``linear_1``, ``linear_2``): the caption and CLIP projections."""

    def __init__(self, in_dim: int, out_dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.linear_1 = operations.Linear(in_dim, out_dim, dtype=dtype, device=device)
        self.linear_2 = operations.Linear(out_dim, out_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class PatchEmbed(nn.Module):
    """pxp patch conv per frame (key ``proj``) plus PixArt's sin-cos table of one frame."""

    def __init__(self, cfg: TransformerV3Config, dtype=None, device=None, operations=None):
        super().__init__()
        p = cfg.patch_size
        self.proj = operations.Conv2d(cfg.in_channels, cfg.inner_dim, p, stride=p, dtype=dtype, device=device)
        self.base_size = cfg.sample_size // p
        self.scale = max(cfg.sample_size // 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, F*h*w, D], tokens ordered (frame, row, column)."""
        b, _, f = x.shape[:3]
        x = self.proj(x.transpose(1, 2).flatten(0, 1))  # [B*F, D, h, w]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B*F, hw, D]
        table = sincos_2d_pixart(x.shape[-1], gh, gw, self.base_size, self.scale).to(x.device)
        return (x.float() + table).to(x.dtype).reshape(b, f * gh * gw, -1)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class EasyAnimateV3Transformer3D(nn.Module):
    """The V1-V3 denoiser: latents [B, 4, F, H, W] + T5 states -> [B, 8, F, H, W] (noise ; variance)."""

    version = "V3"

    def __init__(
        self,
        config: TransformerV3Config | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations=None,
        **overrides,
    ):
        super().__init__()
        config = (config or V3_XL_INP).replace(**overrides)
        if config.enable_uvit and config.num_layers > UVIT_FIRST_POP + UVIT_PUSHES:
            raise ValueError(
                f"U-ViT long skips pair at most {UVIT_FIRST_POP + UVIT_PUSHES} blocks (the official layout)"
            )
        for kinds in (config.motion_even, config.motion_odd):
            if set(kinds) - set(MOTION_KINDS):
                raise ValueError(f"motion attention kinds must be among {MOTION_KINDS}, got {kinds}")
        self.config = config
        self.dtype = dtype or torch.float32
        operations = operations or default_operations
        kw = {"dtype": dtype, "device": device, "operations": operations}
        dim = config.inner_dim

        self.pos_embed = PatchEmbed(config, **kw)
        self.transformer_blocks = nn.ModuleList(PixArtMotionBlock(config, i, **kw) for i in range(config.num_layers))
        self.long_connect_fc = None
        if config.enable_uvit:
            self.long_connect_fc = nn.ModuleList(
                operations.Linear(dim, dim, dtype=dtype, device=device) for _ in range(len(config.skip_layers[1]))
            )
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim, dtype=dtype, device=device))
        self.proj_out = operations.Linear(dim, config.patch_size**2 * config.out_channels, dtype=dtype, device=device)
        self.adaln_single = AdaLayerNormSingle(dim, config.use_additional_conditions, **kw)
        self.caption_projection = TwoLayerProjection(config.caption_channels, dim, **kw)
        self.clip_projection = None
        if config.has_clip:
            self.clip_projection = TwoLayerProjection(CLIP_EMBED_DIM, CLIP_TOKENS * dim, **kw)
        self.gradient_checkpointing = False
        if self.scale_shift_table.device.type != "meta":
            self.init_raw_parameters()

    @torch.no_grad()
    def init_raw_parameters(self) -> None:
        """The official initial values of the parameters no layer initialises (loaders overwrite them all)."""
        dim = self.config.inner_dim
        self.scale_shift_table.normal_().div_(dim**0.5)
        for block in self.transformer_blocks:
            block.scale_shift_table.normal_().div_(dim**0.5)

    def derived_tensor(self, key: str) -> torch.Tensor | None:
        """The value of a deterministic buffer a checkpoint may omit (``...pos_encoder.pe``), else None."""
        if key.endswith(".pos_encoder.pe") and self.config.temporal_position_encoding:
            return temporal_table(self.config.inner_dim, TIME_TABLE_LENGTH)
        return None

    def validate_inputs(self, x, text, text_mask, inpaint_latents, clip, clip_mask) -> None:
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        b, c, _f, h, w = x.shape
        if c != cfg.latent_channels:
            raise ValueError(f"latents have {c} channels; this model denoises {cfg.latent_channels}-channel latents")
        n = cfg.patch_size * cfg.motion_block_size
        for name, size in (("height", h), ("width", w)):
            if size % n:
                raise ValueError(f"latent {name} {size} is not divisible by {n} (patch size x motion block size)")
        if cfg.inpaint_channels:
            if inpaint_latents is None or inpaint_latents.shape != (b, cfg.inpaint_channels, *x.shape[2:]):
                raise ValueError(
                    f"this InP model needs inpaint_latents [B, {cfg.inpaint_channels}, F, H, W] (zeros: text-to-video)"
                )
        elif inpaint_latents is not None:
            raise ValueError("this model is text-to-video only; pass inpaint_latents=None")
        if text is None or text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.caption_channels:
            raise ValueError(f"encoder_hidden_states must be [B={b}, S, {cfg.caption_channels}] T5 states")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(
                f"encoder_attention_mask has shape {tuple(text_mask.shape)}; expected {tuple(text.shape[:2])}"
            )
        if clip is not None:
            if not cfg.has_clip:
                raise ValueError("this model has no CLIP image projection; pass clip_encoder_hidden_states=None")
            if tuple(clip.shape) != (b, CLIP_EMBED_DIM):
                raise ValueError(f"clip_encoder_hidden_states must be [B, {CLIP_EMBED_DIM}] CLIP image_embeds")
        if clip_mask is not None and (clip is None or tuple(clip_mask.shape) != (b, CLIP_TOKENS)):
            raise ValueError(f"clip_attention_mask needs clip_encoder_hidden_states and shape [B, {CLIP_TOKENS}]")

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        inpaint_latents: torch.Tensor | None = None,
        clip_encoder_hidden_states: torch.Tensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict [noise ; variance] for latents at ``timestep`` [B] in [0, 1000).

        ``encoder_attention_mask`` [B, S] (1 keep, 0 padding) defaults to all ones. An InP model takes
        ``inpaint_latents`` [B, 8, F, H, W] = [mask latents ; masked-video latents] and, optionally, the CLIP
        ``image_embeds`` [B, 768] with ``clip_attention_mask`` [B, 8]. ``resolution`` [B, 2] (pixels) and
        ``aspect_ratio`` [B, 1] are used by sample_size-128 models only (default: the latents' pixel size).
        """
        self.validate_inputs(
            hidden_states, encoder_hidden_states, encoder_attention_mask, inpaint_latents,
            clip_encoder_hidden_states, clip_attention_mask,
        )  # fmt: skip
        cfg = self.config
        b, _c, f, h, w = hidden_states.shape
        p = cfg.patch_size
        gh, gw = h // p, w // p
        dtype, device = hidden_states.dtype, hidden_states.device
        timestep = timestep.to(device).expand(b) if timestep.ndim == 0 else timestep.to(device)
        if cfg.use_additional_conditions:
            if resolution is None:
                resolution = torch.tensor([[h * 8.0, w * 8.0]], device=device).expand(b, 2)
            if aspect_ratio is None:
                aspect_ratio = torch.tensor([[h / w]], device=device).expand(b, 1)

        x = hidden_states if inpaint_latents is None else torch.cat([hidden_states, inpaint_latents.to(dtype)], 1)
        x = self.pos_embed(x)  # [B, N, D]
        modulation, temb = self.adaln_single(timestep, resolution, aspect_ratio, dtype)
        text = self.caption_projection(encoder_hidden_states.to(dtype))  # [B, S, D]
        keep = None if encoder_attention_mask is None else encoder_attention_mask.to(device).bool()
        if clip_encoder_hidden_states is not None:
            clip = self.clip_projection(clip_encoder_hidden_states.to(device, dtype)).view(b, CLIP_TOKENS, -1)
            text = torch.cat([text, clip], dim=1)
            if keep is not None or clip_attention_mask is not None:
                text_keep = keep if keep is not None else torch.ones(b, text.shape[1] - CLIP_TOKENS, device=device)
                clip_keep = clip_attention_mask if clip_attention_mask is not None else torch.ones(b, CLIP_TOKENS)
                keep = torch.cat([text_keep.bool(), clip_keep.to(device).bool()], dim=1)

        pushes, pops = cfg.skip_layers
        skips = []
        for i, block in enumerate(self.transformer_blocks):
            if i in pops:
                x = x + self.long_connect_fc[i - pops.start](skips.pop())
            args = (x, text, keep, modulation, f, gh, gw)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
            if i in pushes:
                skips.append(x)

        shift, scale = (cast_param(self.scale_shift_table, x)[None] + temb[:, None]).chunk(2, dim=1)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift
        x = self.proj_out(x)  # [B, N, p*p*C], last axis laid out (p_h, p_w, c)
        x = x.reshape(b, f, gh, gw, p, p, cfg.out_channels)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, cfg.out_channels, f, h, w)
