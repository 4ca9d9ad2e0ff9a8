"""A pool of local worker processes that run one transformer sequence- / CFG-parallel, driven call by call.

A host that is one process (ComfyUI) cannot be a torchrun job. It starts a ``WorkerPool``: ``layout.world_size``
processes (``python -m easyanimate_core.parallel.worker``), one per device, forming their own torch.distributed
group (NCCL on GPUs, gloo on the CPU). The host sends the weights once (``load``) and then every model call
(``forward``); each worker computes its share and rank 0 sends back the whole prediction.

    pool = WorkerPool(ParallelLayout(ulysses=2), ["cuda:0", "cuda:1"])
    pool.load(config, state_dict)                 # again whenever the weights change (a LoRA patched in)
    out = pool.forward({"hidden_states": x, "timestep": t, "encoder_hidden_states": text, ...})
    pool.close()

Messages travel over ``multiprocessing.connection`` on 127.0.0.1 with a random key (HMAC handshake): a JSON header,
then the tensors as safetensors bytes. Nothing is pickled. The weights go through a safetensors file in a private
temporary folder (the workers map it), deleted once every worker has read it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from safetensors.torch import save_file

from .layout import ParallelLayout

WORKER_MODULE = "easyanimate_core.parallel.worker"
KEY_VARIABLE = "EASYANIMATE_WORKER_KEY"  # the connection key travels in the environment, not on the command line
CONNECT_TIMEOUT_S = 300.0  # importing torch and initialising NCCL on 8 GPUs can take a while
ERROR_GRACE_S = 3.0  # after one worker fails, how long the others get to report before the pool is shut down


def send_message(conn: Connection, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """A JSON header, then (when ``tensors`` is given, maybe empty) the tensors as safetensors bytes."""
    conn.send_bytes(json.dumps({**header, "tensors": tensors is not None}).encode())
    if tensors is not None:
        conn.send_bytes(save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}))


def receive_message(conn: Connection) -> tuple[dict, dict[str, torch.Tensor]]:
    header = json.loads(conn.recv_bytes())
    return header, (load_tensors(conn.recv_bytes()) if header.pop("tensors") else {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerError(RuntimeError):
    """A worker failed (its message says where); the pool is closed."""


class WorkerPool:
    """``layout.world_size`` worker processes on ``devices`` (one each: "cuda:0", ..., or "cpu")."""

    def __init__(self, layout: ParallelLayout, devices: list[str], threads: int | None = None):
        if len(devices) != layout.world_size:
            raise ValueError(f"{layout.describe()} needs {layout.world_size} devices, {len(devices)} were given")
        self.layout, self.devices = layout, list(devices)
        self.weights_key = None  # what the host says identifies the weights loaded last
        key = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=key)
        package_root = str(Path(__file__).resolve().parents[2])  # the folder holding easyanimate_core
        env = {**os.environ, KEY_VARIABLE: key.hex(), "PYTHONPATH": os.pathsep.join([package_root, *sys.path])}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        host, port = self._listener.address
        dist_port = free_port()
        self._processes = [
            subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, f"{host}:{port}", str(rank), device, str(dist_port)]
                + [str(layout.ulysses), str(layout.ring), str(layout.cfg)],
                env=env,
            )
            for rank, device in enumerate(self.devices)
        ]
        self._conns: list[Connection | None] = [None] * layout.world_size
        try:
            self._accept()
            self._replies()  # each has joined the process group
        except BaseException:
            self.close()
            raise

    def _accept(self) -> None:
        # Accept with a short timeout so that a worker that dies while starting (an import error, a bad device) is
        # reported rather than waited for. Listener has no public timeout: its socket's is set.
        self._listener._listener._socket.settimeout(2.0)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        accepted = 0
        while accepted < len(self._conns):
            self._check_running("while starting")
            if time.monotonic() > deadline:
                raise WorkerError(f"parallel workers did not connect within {CONNECT_TIMEOUT_S:.0f} s")
            try:
                conn = self._listener.accept()
            except TimeoutError:
                continue
            header, _ = receive_message(conn)
            self._conns[header["rank"]] = conn
            accepted += 1

    def _check_running(self, when: str) -> None:
        for rank, process in enumerate(self._processes):
            if process.poll() is not None:
                raise WorkerError(
                    f"parallel worker {rank} ({self.devices[rank]}) exited with code {process.returncode} {when} "
                    "(its error is in the log above)"
                )

    def _replies(self) -> list[tuple[dict, dict]]:
        """Every worker's reply; a failed worker's error (the others may be stuck in a collective: the pool is shut
        down) as WorkerError."""
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        replies, errors = {}, {}
        grace = None
        while pending:
            ready = wait(list(pending), timeout=1.0)
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    replies[rank] = receive_message(conn)
                except (EOFError, OSError) as e:
                    errors[rank] = f"stopped ({e})"
                    continue
                if "error" in replies[rank][0]:
                    errors[rank] = replies[rank][0]["error"]
            if errors and pending:
                grace = grace or time.monotonic() + ERROR_GRACE_S
                if time.monotonic() > grace:
                    break
            if not ready and not errors:
                try:
                    self._check_running("during a call")
                except WorkerError:
                    self.close()
                    raise
        if errors:
            self.close(stuck=bool(pending))
            messages = set(errors.values())  # a check that failed fails the same on every rank: say it once
            raise WorkerError(
                next(iter(messages))
                if len(messages) == 1
                else "; ".join(f"worker {r}: {m}" for r, m in sorted(errors.items()))
            )
        return [replies[rank] for rank in range(len(self._conns))]

    def load(self, config, state_dict: dict[str, torch.Tensor], key=None) -> None:
        """Build the V5 / V5.1 transformer ``config`` on every worker with these weights (kept in their dtypes)."""
        with tempfile.TemporaryDirectory(prefix="easyanimate-weights-") as folder:
            path = os.path.join(folder, "transformer.safetensors")
            save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, path)
            for conn in self._conns:
                send_message(conn, {"op": "load", "path": path, "config": asdict(config)})
            self._replies()
        self.weights_key = key

    def forward(self, tensors: dict[str, torch.Tensor], options: dict | None = None) -> torch.Tensor:
        """One transformer call: keyword tensors (``hidden_states``, ``timestep``, ``encoder_hidden_states``, ...) and
        JSON ``options`` (``rope_temporal_frequency``, ``attention``) -> the prediction, on the CPU."""
        for conn in self._conns:
            send_message(conn, {"op": "forward", "options": options or {}}, tensors)
        return self._replies()[0][1]["out"]

    def close(self, stuck: bool = False) -> None:
        """Ask the workers to stop, then make sure they have (``stuck``: some wait in a collective: kill them)."""
        for conn in self._conns:
            if conn is not None:
                try:
                    send_message(conn, {"op": "exit"})
                    conn.close()
                except OSError:
                    pass
        for process in self._processes:
            try:
                process.wait(timeout=1 if stuck else 10)
            except subprocess.TimeoutExpired:  # stuck in a collective after another worker failed
                process.kill()
                process.wait()
        self._listener.close()
        self._conns = [None] * len(self._conns)

    @property
    def alive(self) -> bool:
        return all(c is not None for c in self._conns) and all(p.poll() is None for p in self._processes)
