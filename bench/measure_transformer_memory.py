"""Peak activation memory of one transformer forward vs sequence length and width (fits nodes' memory estimate).

    python bench/measure_transformer_memory.py [--dtype float32|bfloat16]

Runs the V5.1 InP transformer (random weights, torch.no_grad, as ComfyUI samples) at two widths and several
latent sizes on CPU and records the peak of live tensor bytes created during the forward (weights and inputs
excluded), counted by a dispatch mode over every op's outputs. Prints, per run, the peak divided by
batch x (image tokens + text tokens) x inner_dim x element size: the constant nodes/native_model.py uses.
"""

from __future__ import annotations

import argparse
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from easyanimate_core.transformer import VARIANT_IN_CHANNELS, EasyAnimateTransformer3D, TransformerConfig

TEXT_TOKENS = 256  # V5.1's prompt length; V5 adds 77 BERT tokens and 256 mT5 tokens projected into the stream


class PeakTensorBytes(TorchDispatchMode):
    """Tracks the bytes of storages created inside the mode that are still alive, and their peak."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()
        # Views of weights and inputs (a transposed weight, a reshaped input) share their storage: not new memory.
        self.existing = {t.untyped_storage().data_ptr() for t in existing}

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen and key not in self.existing:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def measure(inner_heads: int, frames: int, h: int, w: int, dtype: torch.dtype, batch: int = 1) -> tuple[int, int, int]:
    """(peak activation bytes, tokens, inner_dim) of one forward."""
    cfg = TransformerConfig(
        num_attention_heads=inner_heads,
        attention_head_dim=64,
        in_channels=VARIANT_IN_CHANNELS["V5.1"]["InP"],
        num_layers=2,
        mmdit_layers=1,
        time_embed_dim=64,
        text_embed_dim=64,
        add_norm_text_encoder=True,
    )
    model = EasyAnimateTransformer3D(cfg, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    t = (frames - 1) // 4 + 1
    x = torch.randn(batch, 16, t, h // 8, w // 8, generator=g).to(dtype)
    text = torch.randn(batch, TEXT_TOKENS, 64, generator=g).to(dtype)
    inpaint = torch.zeros(batch, 17, *x.shape[2:], dtype=dtype)
    step = torch.full((batch,), 500.0, dtype=dtype)
    existing = [*model.parameters(), *model.buffers(), x, text, inpaint, step]
    with torch.no_grad(), PeakTensorBytes(existing) as tracker:
        model(x, step, text, inpaint_latents=inpaint)
    tokens = t * (h // 16) * (w // 16)
    return tracker.peak, tokens, cfg.inner_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    dtype = getattr(torch, parser.parse_args().dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    print("heads inner frames  h   w  tokens  peak_MiB  peak/(B*(tokens+text)*inner*bytes)")
    for heads in (2, 8):
        for frames, h, w in ((1, 64, 64), (9, 64, 128), (17, 128, 128), (25, 128, 224)):
            peak, tokens, inner = measure(heads, frames, h, w, dtype)
            ratio = peak / ((tokens + TEXT_TOKENS) * inner * size)
            print(f"{heads:5d} {inner:5d} {frames:6d} {h:3d} {w:3d} {tokens:7d} {peak / 2**20:9.2f}  {ratio:6.2f}")


if __name__ == "__main__":
    main()
