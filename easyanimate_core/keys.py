"""Checkpoint key layouts: the official EasyAnimate names (ours) and the diffusers re-export's names.

Only the dual-stream text attention differs (spec §3.7): the official `attn2.*` projections are
diffusers' `attn1.add_*` / `norm_added_*` / `to_add_out`. VAE keys are identical in both layouts.
"""

from __future__ import annotations

import re

# official suffix (after "transformer_blocks.N.") -> diffusers suffix
_OFFICIAL_TO_DIFFUSERS = {
    "attn2.to_q.": "attn1.add_q_proj.",
    "attn2.to_k.": "attn1.add_k_proj.",
    "attn2.to_v.": "attn1.add_v_proj.",
    "attn2.norm_q.": "attn1.norm_added_q.",
    "attn2.norm_k.": "attn1.norm_added_k.",
    "attn2.to_out.0.": "attn1.to_add_out.",
}
_DIFFUSERS_TO_OFFICIAL = {v: k for k, v in _OFFICIAL_TO_DIFFUSERS.items()}
_BLOCK = re.compile(r"^(transformer_blocks\.\d+\.)(.*)$")

# Prefixes that wrap a bare transformer state dict in some single-file exports.
_WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.", "model.")


def _rename(key: str, table: dict[str, str]) -> str:
    m = _BLOCK.match(key)
    if not m:
        return key
    block, rest = m.groups()
    for old, new in table.items():
        if rest.startswith(old):
            return block + new + rest[len(old) :]
    return key


def diffusers_to_official(key: str) -> str:
    """A diffusers transformer key in the official layout (other keys unchanged)."""
    return _rename(key, _DIFFUSERS_TO_OFFICIAL)


def official_to_diffusers(key: str) -> str:
    """An official transformer key in the diffusers layout (other keys unchanged)."""
    return _rename(key, _OFFICIAL_TO_DIFFUSERS)


def is_diffusers_layout(keys) -> bool:
    """True if any key uses diffusers' names for the dual-stream text attention."""
    return any(".attn1.add_q_proj." in k or ".attn1.to_add_out." in k for k in keys)


def strip_wrapper_prefix(keys) -> str:
    """The prefix every key shares among the known wrapper prefixes ('' if none)."""
    keys = list(keys)
    for prefix in _WRAPPER_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def strip_key_prefix(key: str) -> str:
    """``key`` without the first known wrapper prefix (per key: LoRA files mix prefixed and bare keys)."""
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key
