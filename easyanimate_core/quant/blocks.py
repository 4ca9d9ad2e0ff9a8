"""GGML block formats in torch: pack float weights into blocks and unpack them, on any device.

    dequantize(raw, kind, shape, dtype) -> tensor     raw: uint8 [rows, bytes per row]
    quantize(weight, kind) -> raw uint8 [rows, bytes per row]
    SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q5_K", "Q4_K")

Layouts (the ggml ones, so files interoperate with other GGUF tools; each row of a [out, in] weight is its own run
of blocks along ``in``):
* Q8_0: 32 values a block: scale d (fp16), 32 int8 q; value = d * q. 34 bytes.
* Q4_K: 256 values a block in 8 sub-blocks of 32: d, dmin (fp16), 12 bytes of 6-bit sub-block scales and mins,
  128 bytes of 4-bit q (64 values per 32 bytes: low nibbles are one sub-block, high nibbles the next); value =
  d * scale_j * q - dmin * min_j. 144 bytes.
* Q5_K: as Q4_K plus 32 bytes of fifth bits (bit j of byte l is the high bit of value l of sub-block j). 176 bytes.
The quantizers here are plain min / max fits per sub-block (no search for the best scales, as llama.cpp does):
a little less exact than llama.cpp's files at the same size, read back by the same dequantizer.
"""

from __future__ import annotations

import torch

SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q5_K", "Q4_K")
BLOCK = {"Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176)}  # values and bytes per block
FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Two bytes per row -> float16 [rows, 1]."""
    return raw.contiguous().view(torch.float16).float()


def _scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes of K blocks [n, 12] -> 6-bit scales and mins [n, 8]."""
    q = packed.to(torch.int32)
    low_sc, low_m = q[:, 0:4] & 63, q[:, 4:8] & 63
    high_sc = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    high_m = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return torch.cat([low_sc, high_sc], 1).float(), torch.cat([low_m, high_m], 1).float()


def _pack_scales_and_mins(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins [n, 8] -> the 12 scale bytes of K blocks [n, 12] (inverse of _scales_and_mins)."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    first = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    second = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([first, second, third], 1).to(torch.uint8)


def _k_values(blocks: torch.Tensor, fifth_bits: bool) -> torch.Tensor:
    """K blocks [n, 144 or 176] -> values [n, 256] (float32)."""
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, m = _scales_and_mins(blocks[:, 4:16])
    qs = blocks[:, -128:].to(torch.int32).view(-1, 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], dim=2).view(-1, 8, 32)  # sub-blocks 2g (low nibbles), 2g + 1 (high)
    if fifth_bits:
        qh = blocks[:, 16:48].to(torch.int32)  # [n, 32]
        q = q + 16 * ((qh[:, None, :] >> torch.arange(8, device=qh.device)[None, :, None]) & 1)
    return ((d * sc)[:, :, None] * q - (dmin * m)[:, :, None]).view(-1, 256)


def dequantize(raw: torch.Tensor, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A weight of ``shape`` in ``dtype`` from its stored bytes ``raw`` (uint8) in format ``kind``."""
    if kind in FLOAT:
        return raw.contiguous().view(FLOAT[kind]).view(shape).to(dtype)
    values, size = BLOCK[kind]
    blocks = raw.reshape(-1, size)
    if kind == "Q8_0":
        out = _f16(blocks[:, :2]) * blocks[:, 2:].contiguous().view(torch.int8).float()
    else:
        out = _k_values(blocks, fifth_bits=kind == "Q5_K")
    return out.view(shape).to(dtype)


def quantize(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The bytes [rows, bytes per row] of ``weight`` (its last axis a multiple of the block size) in ``kind``."""
    if kind in FLOAT:
        w = weight.to(FLOAT[kind]).contiguous()
        return w.view(torch.uint8).view(-1, w.shape[-1] * w.element_size())
    values, size = BLOCK[kind]
    if weight.shape[-1] % values:
        raise ValueError(f"a {kind} row needs a multiple of {values} values; this one has {weight.shape[-1]}")
    rows = weight.reshape(-1, weight.shape[-1]).float()
    x = rows.reshape(-1, values)
    if kind == "Q8_0":
        d = x.abs().amax(1, keepdim=True) / 127
        q = torch.where(d > 0, x / d.clamp_min(1e-30), 0).round().clamp(-127, 127).to(torch.int8)
        packed = torch.cat([d.half().view(torch.uint8).view(-1, 2), q.view(torch.uint8)], 1)
        return packed.view(rows.shape[0], -1)
    top = 31 if kind == "Q5_K" else 15
    sub = x.view(-1, 8, 32)
    low = sub.amin(-1).clamp(max=0)
    scale = (sub.amax(-1) - low) / top  # [n, 8]
    d, dmin = scale.amax(1, keepdim=True) / 63, (-low).amax(1, keepdim=True) / 63
    sc = torch.where(d > 0, scale / d.clamp_min(1e-30), 0).round().clamp(0, 63)
    m = torch.where(dmin > 0, -low / dmin.clamp_min(1e-30), 0).round().clamp(0, 63)
    d, dmin = d.half().float(), dmin.half().float()  # what the file holds
    step, offset = (d * sc)[:, :, None], (dmin * m)[:, :, None]
    q = torch.where(step > 0, (sub + offset) / step.clamp_min(1e-30), 0).round().clamp(0, top).to(torch.int32)
    pairs = q.view(-1, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).to(torch.uint8).view(-1, 128)
    parts = [d.half().view(torch.uint8).view(-1, 2), dmin.half().view(torch.uint8).view(-1, 2)]
    parts.append(_pack_scales_and_mins(sc, m))
    if kind == "Q5_K":
        bits = (q >> 4) & 1  # [n, 8, 32]
        qh = (bits << torch.arange(8)[None, :, None]).sum(1).to(torch.uint8)  # [n, 32]
        parts.append(qh)
    parts.append(qs)
    return torch.cat(parts, 1).view(rows.shape[0], -1)
