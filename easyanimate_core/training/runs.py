"""What every training run shares (the transformer trainer, the VAE trainer): its processes, how it starts (a
fresh output folder or a checkpoint to resume), the signals that stop it at a step boundary, and what it says
when stopped (the command that resumes it)."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..atomic import remove_partials
from .files import checkpoint_dir, read_checkpoint, write_json

LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class Processes:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (so that all of them act on it at the same step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def total(self, value: float) -> float:
        """``value`` summed over the processes (for the logged loss)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def gather(self, obj) -> list | None:
        """Every process's ``obj`` on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out


def start_processes(device: str | None) -> Processes:
    """Join the process group that torchrun / accelerate describe in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        dev = torch.device(device)
    else:
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index if dev.index is not None else local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Processes(rank, world, dev)


def run_in_processes(device: str | None, train: Callable[[Processes], object]):
    """``train(procs)`` in the process group torchrun / accelerate describe; the group is left afterwards."""
    procs = start_processes(device)
    try:
        return train(procs)
    finally:
        if procs.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def unlaunched_processes() -> bool:
    """Whether ``accelerate launch --num_processes N`` (N > 1) started a single process: its simple launcher,
    which it uses without --multi_cpu / --multi_gpu, sets MASTER_ADDR for the processes it did not start but no
    WORLD_SIZE (accelerate 1.x, ``prepare_simple_launcher_cmd_env``)."""
    env = os.environ
    launched_by_accelerate = any(key.startswith("ACCELERATE_") for key in env)
    return launched_by_accelerate and "MASTER_ADDR" in env and "WORLD_SIZE" not in env


def resume_command(args) -> str:
    """The command that continues this run: the same one with ``--resume latest`` (under torchrun / accelerate,
    the same launcher with these arguments)."""
    import shlex

    argv = list(getattr(args, "argv", None) or [])
    if not argv:
        return "the same command with --resume latest"
    kept = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return "easyanimate " + shlex.join([*kept, "--resume", "latest"])


class StopSignals:
    """While active, SIGTERM (what schedulers send) and SIGINT (Ctrl-C) ask the run to stop after the current
    step, with a checkpoint; a second signal stops at once (KeyboardInterrupt, no checkpoint)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.received: str | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.log(f"\n{self.received}: stopping after this step with a checkpoint (send it again to stop at once)")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class TrainingInterrupted(Exception):
    """Stopped at once after ``step`` (a second Ctrl-C / SIGTERM, or a callback): no checkpoint of this step."""

    def __init__(self, step: int, output: Path, resume: str = "the same command with --resume latest"):
        super().__init__(
            f"interrupted after step {step}; the last checkpoint in {output / 'checkpoints'} continues with:\n"
            f"  {resume}"
        )
        self.step = step


class TrainingStopped(Exception):
    """SIGTERM / SIGINT stopped the run at a step boundary, after writing a checkpoint of ``step``."""

    def __init__(self, step: int, output: Path, signal_name: str, resume: str):
        super().__init__(
            f"{signal_name}: stopped after step {step} and wrote {checkpoint_dir(output, step)}; continue with:\n"
            f"  {resume}"
        )
        self.step, self.signal_name = step, signal_name


def refuse_earlier_outputs(args, output: Path, earlier: list[Path]) -> None:
    """A fresh run never replaces what an earlier run in ``--output`` trained (``earlier``: its weights and
    checkpoints); ValueError naming --resume."""
    found = [p for p in earlier if p.exists()]
    if found:
        raise ValueError(
            f"--output {args.output} holds the outputs of an earlier run ({found[0].name}): add --resume latest "
            "to continue it (with a higher --max-steps), or choose another --output"
        )


@dataclass
class RunStart:
    """Where a run starts: step 0, or a checkpoint's step with its saved state, optimizer state and RNG states."""

    step: int = 0
    saved: dict | None = None
    optimizer_state: dict | None = None
    rng: tuple | None = None


def start_run(
    args, procs: Processes, output: Path, resume: Path | None, fingerprint: dict, strict: tuple[str, ...], log
) -> RunStart:
    """Read the checkpoint to resume (its fingerprint checked), refuse one at or past --max-steps, and ready the
    output folder (partial files of a killed run removed, the run's arguments written)."""
    start = RunStart()
    if resume:
        start.saved, start.optimizer_state, start.rng = read_checkpoint(resume, procs.rank)
        check_fingerprint(start.saved["fingerprint"], fingerprint, strict, log)
        start.step = start.saved["step"]
        log(f"resuming from {resume} (step {start.step})")
    if start.step >= args.max_steps:
        raise ValueError(f"the checkpoint is at step {start.step}; raise --max-steps above it to train further")
    if procs.main:
        remove_partials(output)
        remove_partials(output / "checkpoints")
        write_json(output / "training_args.json", {k: v for k, v in vars(args).items() if k != "func"})
    procs.barrier()
    return start


def check_fingerprint(saved: dict, current: dict, strict: tuple[str, ...], log: Callable[[str], None]) -> None:
    """A resumed run's settings against its checkpoint's: ValueError when a ``strict`` one differs (it decides what
    is trained on), a warning for the others (the run then does not repeat the original exactly)."""
    differ = [k for k in current if saved.get(k) != current[k]]
    refused = [k for k in differ if k in strict]
    if refused:
        raise ValueError(
            f"cannot resume: this run differs from the checkpoint in {', '.join(refused)}; "
            "use the same model, data and settings, or start a new output folder"
        )
    if differ:
        log(f"warning: resuming with other {', '.join(differ)}: the run will not repeat the original exactly")


def exit_code(run: Callable, args) -> int:
    """``run(args)`` as a command: its exit code, with errors printed instead of raised (2: a bad option or input;
    1: a failed read or write; as a shell reports a signal for a stop by SIGTERM / SIGINT)."""
    from ..checks import io_error_message

    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        return 128 + getattr(signal, e.signal_name, signal.SIGTERM)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {io_error_message(e, 'then continue with ' + resume_command(args))}", file=sys.stderr)
        return 1
    return 0


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate for 0-based optimizer step ``step`` of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)
