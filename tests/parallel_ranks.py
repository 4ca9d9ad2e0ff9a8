"""What each process of the parallel tests runs (imported by spawned processes: module-level functions only)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from easyanimate_core.parallel import ParallelLayout, SequenceParallel, make_groups

TEXT_TOKENS = 6


def start(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)  # several processes share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def random_qkv(seed: int, heads: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [1, heads, TEXT_TOKENS + tokens, 16], the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, TEXT_TOKENS + tokens, 16, generator=g) for _ in range(3))


def attention_rank(rank: int, world: int, port: int, out: str, layout: dict) -> None:
    """The sequence-parallel attention of this rank's shard, gathered back into token order."""
    start(rank, world, port)
    sp = SequenceParallel(make_groups(ParallelLayout(**layout)))
    q, k, v = random_qkv(0, heads=4, tokens=24)
    shard = [torch.cat([t[:, :, :TEXT_TOKENS], sp.shard(t[:, :, TEXT_TOKENS:], dim=2)], 2) for t in (q, k, v)]
    result = sp.attention(*shard, TEXT_TOKENS)
    whole = torch.cat([result[:, :, :TEXT_TOKENS], sp.gather(result[:, :, TEXT_TOKENS:], dim=2)], 2)
    save_file({"out": whole.contiguous()}, os.path.join(out, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


def generate_rank(rank: int, world: int, port: int, out: str, layout: dict, variant: str, kwargs: dict) -> None:
    """tests.test_parallel.run_generation on this rank."""
    from tests.test_parallel import run_generation

    start(rank, world, port)
    groups = make_groups(ParallelLayout(**layout))
    latents = run_generation(variant, parallel=groups, **kwargs)
    save_file({"latents": latents.contiguous()}, str(Path(out) / f"rank{rank}.safetensors"))
    dist.destroy_process_group()
