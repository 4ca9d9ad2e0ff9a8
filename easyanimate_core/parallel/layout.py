"""How ranks are laid out for parallel generation, and the process groups that follow from it.

    world = cfg x ring x ulysses          cfg: 2 with CFG-parallel (each guidance branch on its own ranks), else 1
    rank  = (cfg_index * ring + ring_index) * ulysses + ulysses_index

The ``ring x ulysses`` ranks of one CFG branch share one sample's video tokens (sequence parallel): its shard index
is ``ring_index * ulysses + ulysses_index``, so shards are in rank order inside the group and an all-gather puts them
back in token order. Ulysses groups are consecutive ranks (the all-to-all is the heaviest collective: on a multi-GPU
box consecutive ranks share the fastest links).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of parallelism: ``ulysses`` (heads split by all-to-all), ``ring`` (keys and values passed round),
    ``cfg`` (1, or 2 for the two guidance branches side by side)."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    def __post_init__(self):
        for name in ("ulysses", "ring"):
            if getattr(self, name) < 1:
                raise ValueError(f"the {name} degree must be 1 or more, got {getattr(self, name)}")
        if self.cfg not in (1, 2):
            raise ValueError(f"the CFG degree is 1 or 2 (one rank group per guidance branch), got {self.cfg}")

    @property
    def sequence(self) -> int:
        """Ranks sharing one sample's tokens."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg * self.sequence

    def describe(self) -> str:
        return f"ulysses {self.ulysses} x ring {self.ring} x cfg {self.cfg} = {self.world_size} processes"

    def indices(self, rank: int) -> tuple[int, int, int]:
        """(cfg_index, ring_index, ulysses_index) of a global rank."""
        cfg_index, sequence_rank = divmod(rank, self.sequence)
        ring_index, ulysses_index = divmod(sequence_rank, self.ulysses)
        return cfg_index, ring_index, ulysses_index

    def check_world(self, world_size: int, flags: str = "--ulysses-degree x --ring-degree x (2 with --cfg-parallel)"):
        """Raise when the processes started are not the product of the degrees."""
        if world_size != self.world_size:
            raise ValueError(
                f"{world_size} processes were started but {flags} = {self.describe()}: start "
                f"{self.world_size} (torchrun --nproc_per_node {self.world_size}) or change the degrees"
            )

    def check_model(self, heads: int, tokens: int, where: str = "") -> None:
        """Raise when the degrees do not divide the attention heads or the video tokens of one model call."""
        self.check_heads(heads)
        self.check_tokens(tokens, where)

    def check_heads(self, heads: int) -> None:
        """Raise when the Ulysses degree does not divide the attention heads."""
        if heads % self.ulysses:
            fits = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 16]
            raise ValueError(
                f"the Ulysses degree {self.ulysses} does not divide the model's {heads} attention heads: use one of "
                f"{fits}, and a ring degree for the rest"
            )

    def check_tokens(self, tokens: int, where: str = "") -> None:
        """Raise when ulysses x ring does not divide the video tokens of one model call."""
        if tokens % self.sequence:
            raise ValueError(
                f"{tokens} video tokens{where} do not split evenly over ulysses x ring = {self.sequence} processes: "
                "change --frames / --width / --height (tokens = latent frames x latent height/2 x latent width/2) "
                "or the degrees"
            )


@dataclass
class ParallelGroups:
    """This process's place in a ``ParallelLayout`` and its process groups (torch.distributed must be initialised).

    ``sequence_group``: the ranks sharing one sample's tokens (shards in group-rank order); ``ulysses_group`` and
    ``ring_group`` inside it; ``cfg_group``: the two ranks holding the same shard of the two branches (None at cfg 1).
    ``ring_ranks``: global ranks of this process's ring, in ring order (point-to-point sends name global ranks).
    """

    layout: ParallelLayout
    rank: int
    sequence_group: object
    ulysses_group: object
    ring_group: object
    cfg_group: object
    ring_ranks: list[int]

    @property
    def cfg_index(self) -> int:
        return self.layout.indices(self.rank)[0]

    @property
    def ring_index(self) -> int:
        return self.layout.indices(self.rank)[1]

    @property
    def ulysses_index(self) -> int:
        return self.layout.indices(self.rank)[2]

    @property
    def shard_index(self) -> int:
        """This rank's shard of the video tokens."""
        return self.ring_index * self.layout.ulysses + self.ulysses_index

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that writes files and reports."""
        return self.rank == 0


def make_groups(layout: ParallelLayout) -> ParallelGroups:
    """Create the process groups of ``layout`` over the initialised default group (every rank must call this, in the
    same order: new_group is collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    layout.check_world(world)
    u, r, c = layout.ulysses, layout.ring, layout.cfg
    mine = {}
    for cfg_index in range(c):
        base = cfg_index * layout.sequence
        ranks = list(range(base, base + layout.sequence))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["sequence"] = group
        for ring_index in range(r):
            ranks = list(range(base + ring_index * u, base + (ring_index + 1) * u))
            group = dist.new_group(ranks)
            if rank in ranks:
                mine["ulysses"] = group
        for ulysses_index in range(u):
            ranks = [base + ring_index * u + ulysses_index for ring_index in range(r)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine["ring"], mine["ring_ranks"] = group, ranks
    mine["cfg"] = None
    if c == 2:
        for shard in range(layout.sequence):
            ranks = [shard, layout.sequence + shard]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine["cfg"] = group
    return ParallelGroups(
        layout, rank, mine["sequence"], mine["ulysses"], mine["ring"], mine["cfg"], mine["ring_ranks"]
    )


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the env:// variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device: torch.device | None = None, init_method: str = "env://", rank=None, world_size=None):
    """Initialise torch.distributed (NCCL on CUDA, gloo on the CPU) unless it already is; return this process's
    device (cuda:LOCAL_RANK on a GPU box, else the given or the CPU)."""
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {} if rank is None else {"rank": rank, "world_size": world_size}
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, **kwargs)
    return device
