"""The stages of ``easyanimate prepare`` as Ray Data pipelines: ``--ray`` (a local Ray instance) or
``--ray-address ADDR`` (a running cluster). Needs ``pip install "ray[data]"``; imported only when asked for.

    ray_problem() -> why Ray cannot be used here, or None
    start_ray(address, cpus) -> a function that stops what was started (nothing if Ray was already running)
    RayExecutor(workers, model_actors)   the executor ``pipeline.run_plan`` takes: one Ray Dataset per stage

Each stage is one Dataset over the items that still need it: CPU stages map one item per Ray task, model stages
map batches in a Ray actor (one model per actor, a GPU each when the device is CUDA). Results stream back to this
process, which records each as it arrives, as the local run does, so resume, verdicts and the dataset JSON are the
same code and give the same JSON. Items and results cross Ray as JSON strings (no Arrow schema to infer).

On a cluster, every node needs this package and its video dependencies installed, and must see SRC and --out at
the same paths (a shared file system): the workers read the sources and write the clips themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .stages import run_batch, run_item

INSTALL = 'pip install "ray[data]"'


def ray_problem() -> str | None:
    """Why Ray Data cannot run here (with the install command), or None."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as e:
        return f"Ray Data is not installed ({e}); {INSTALL}"
    return None


def start_ray(address: str | None, cpus: int | None) -> Callable[[], None]:
    """Connect to the cluster at ``address``, or start a local instance with ``cpus`` CPUs; return the stopper."""
    import ray

    if ray.is_initialized():  # a caller (a notebook, a test) runs Ray already: use it and leave it running
        return lambda: None
    # Local workers import this package from where this process does (a source checkout need not be installed).
    package_parent = str(Path(__file__).resolve().parents[3])
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}} if address is None else None
    options = {"address": address} if address else {"num_cpus": cpus, "include_dashboard": False}
    ray.init(runtime_env=runtime_env, log_to_driver=False, **options)
    return ray.shutdown


def _score_row(stage, row: dict) -> dict:
    """One CPU item through its stage, on a Ray worker."""
    item = json.loads(row["item"])
    return {"item": row["item"], "result": json.dumps(run_item(stage, item))}


class _ModelActor:
    """A Ray actor holding one loaded model stage."""

    def __init__(self, stage):
        self.scorer = stage.load()

    def __call__(self, batch: dict) -> dict:
        items = [json.loads(text) for text in batch["item"]]
        results = run_batch(self.scorer, items)
        return {"item": list(batch["item"]), "result": [json.dumps(r) for r in results]}


class RayExecutor:
    """Runs a stage's items as a Ray Dataset; (item, result) pairs stream back in finishing order."""

    def __init__(self, workers: int | None = None, model_actors: int = 1):
        self.workers = workers  # at most this many CPU tasks at once (None: as many as Ray schedules)
        self.model_actors = model_actors  # copies of a model stage's model (a GPU each on CUDA)

    def map(self, stage, items: list[dict]) -> Iterator[tuple[dict, dict]]:
        """(item, result) for every item."""
        if not items:
            return
        from functools import partial

        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the run shows its own bar per stage
        dataset = ray.data.from_items([{"item": json.dumps(item)} for item in items])
        if stage.model:
            gpus = 1 if stage.device.startswith("cuda") else 0
            dataset = dataset.map_batches(
                _ModelActor,
                fn_constructor_args=(stage,),
                batch_size=stage.batch_size,
                batch_format="numpy",
                concurrency=self.model_actors,
                num_gpus=gpus,
            )
        else:
            dataset = dataset.map(partial(_score_row, stage), num_cpus=1, concurrency=self.workers)
        for row in dataset.iter_rows():
            yield json.loads(row["item"]), json.loads(row["result"])

    def close(self) -> None:
        """Nothing to stop: each stage's Dataset ends with its stage."""
