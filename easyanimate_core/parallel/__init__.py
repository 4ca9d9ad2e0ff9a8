"""Generation on several processes (GPUs): sequence parallelism (Ulysses, ring) and CFG parallelism.

    layout = ParallelLayout(ulysses=2, ring=1, cfg=2)     4 processes
    init_distributed(); groups = make_groups(layout)       every rank, under torchrun (or the worker pool)
    generate(..., parallel=groups)                         every rank; each returns the same latents

``layout.py``: degrees, rank layout and process groups. ``sequence.py``: the sharded attention (the transformer
takes ``sequence_parallel=SequenceParallel(groups)``) and the CFG branch gather. ``workers.py`` / ``worker.py``:
a pool of local worker processes a host such as ComfyUI drives one transformer call at a time.
"""

from .layout import ParallelGroups, ParallelLayout, init_distributed, launched_by_torchrun, make_groups
from .sequence import SequenceParallel, gather_branches

__all__ = [
    "ParallelGroups",
    "ParallelLayout",
    "SequenceParallel",
    "gather_branches",
    "init_distributed",
    "launched_by_torchrun",
    "make_groups",
]
