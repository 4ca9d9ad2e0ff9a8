"""Regional compilation: ``torch.compile`` each transformer block on its own.

    compiled_blocks(transformer) -> {module path: compiled block}     e.g. "transformer_blocks.0"
    compile_blocks(transformer)                                          the same, swapped in place

Compiling block by block instead of the whole model: all blocks of a model share one graph (same shapes and
code), so the compiler traces one block and reuses it, and compile time stays seconds instead of minutes;
``dynamic=True`` keeps a new resolution or frame count from recompiling every block. The first call after
compiling pays the compile time; outputs equal the eager ones to float tolerance (tests/test_speed.py).
"""

from __future__ import annotations

import torch
from torch import nn


def block_paths(transformer: nn.Module) -> list[str]:
    """Module paths of a V5 / V5.1 (``transformer_blocks``) or V4 (``blocks``) transformer's blocks."""
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(transformer, name, None)
        if isinstance(blocks, nn.ModuleList):
            return [f"{name}.{i}" for i in range(len(blocks))]
    raise ValueError(f"{type(transformer).__name__} has no transformer_blocks / blocks to compile")


def compiled_blocks(transformer: nn.Module, mode: str | None = None) -> dict[str, nn.Module]:
    """Each block wrapped by ``torch.compile(dynamic=True)`` (compiles lazily, on its first call)."""
    return {
        path: torch.compile(transformer.get_submodule(path), dynamic=True, mode=mode)
        for path in block_paths(transformer)
    }


def compile_blocks(transformer: nn.Module, mode: str | None = None) -> nn.Module:
    """Swap every block of ``transformer`` for its compiled wrapper, in place; returns ``transformer``."""
    for path, block in compiled_blocks(transformer, mode).items():
        parent, index = path.rsplit(".", 1)
        transformer.get_submodule(parent)[int(index)] = block
    return transformer
