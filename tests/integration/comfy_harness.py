"""Start a real ComfyUI server with this pack installed, and talk to it over HTTP.

Used by the integration tests (tests/integration/conftest.py). Nothing is written into the user's
ComfyUI checkout: the server runs with ``--base-directory`` pointing at a temporary folder whose
``custom_nodes/`` holds only a symlink to this repository (so no other custom nodes are loaded),
an in-memory database, and ``PYTHONDONTWRITEBYTECODE=1``.

Environment:
  COMFYUI_PATH    ComfyUI checkout (the folder with main.py). Integration tests skip without it.
  COMFYUI_PYTHON  interpreter that has ComfyUI's requirements (default: the one running pytest).
  COMFYUI_ARGS    extra server arguments (default: "--cpu"; set to "" to use the GPU).
  COMFYUI_START_TIMEOUT  seconds to wait for the server to answer (default 180).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "comfyui-easyanimate"


class ComfyError(RuntimeError):
    """The server refused a prompt, or a prompt failed while executing."""

    def __init__(self, message: str, payload: Any = None):
        super().__init__(message)
        self.payload = payload


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server process started on a free port, with this pack as its only custom node."""

    def __init__(
        self, comfy_path: Path, base_dir: Path, python: str | None = None, extra_args: list[str] | None = None
    ):
        self.comfy_path = Path(comfy_path)
        self.base_dir = Path(base_dir)
        self.python = python or sys.executable
        self.extra_args = ["--cpu"] if extra_args is None else list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "comfyui.log"
        self.pack_link = self.base_dir / "custom_nodes" / PACK_DIR_NAME
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        if not (self.comfy_path / "main.py").is_file():
            raise FileNotFoundError(f"COMFYUI_PATH={self.comfy_path} has no main.py")
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if not self.pack_link.exists():
            self.pack_link.symlink_to(REPO_ROOT, target_is_directory=True)
        cmd = [
            self.python,
            "main.py",
            *self.extra_args,
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
        ]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        self._log_file = open(self.log_path, "w")  # closed in stop()
        self.process = subprocess.Popen(
            cmd,
            cwd=self.comfy_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with {self.process.returncode} before answering:\n{self.log_tail()}"
                )
            try:
                self.get_json("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer /system_stats within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- log -----------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP ----------------------------------------------------------------------------------
    def request(self, path: str, data: Any = None, timeout: float = 30) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method="GET" if body is None else "POST")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def events(self, client_id: str) -> EventStream:
        """Open the websocket event stream for ``client_id`` (pass the same id to queue_prompt)."""
        return EventStream("127.0.0.1", self.port, client_id)

    def rss_bytes(self) -> int:
        """Resident memory of the server process (VmRSS), in bytes."""
        with open(f"/proc/{self.process.pid}/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    # -- prompts -------------------------------------------------------------------------------
    def queue_prompt(self, prompt: dict, client_id: str | None = None, workflow: dict | None = None) -> str:
        """POST an API-format prompt; return its prompt_id. Raises ComfyError on a 400 (validation)."""
        payload: dict[str, Any] = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        if workflow is not None:
            payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        status, body = self.request("/prompt", payload)
        answer = json.loads(body or b"{}")
        if status != 200:
            raise ComfyError(f"/prompt refused the prompt ({status}): {json.dumps(answer)[:2000]}", answer)
        return answer["prompt_id"]

    def wait_for_history(self, prompt_id: str, timeout: float = 600, poll: float = 0.25) -> dict:
        """Wait until /history has the prompt; return its entry (outputs, status, ...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s:\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 600, **kwargs: Any) -> dict:
        """Queue an API-format prompt and wait for it; return the history entry, or raise ComfyError
        (with the executor's exception message and traceback) when it did not succeed."""
        entry = self.wait_for_history(self.queue_prompt(prompt, **kwargs), timeout=timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success" or not status.get("completed"):
            errors = [m[1] for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
            detail = "\n".join(
                f"{e.get('node_type')} (node {e.get('node_id')}): "
                f"{e.get('exception_type')}: {e.get('exception_message')}\n" + "".join(e.get("traceback", []))
                for e in errors
            )
            raise ComfyError(f"prompt failed: {status.get('status_str')}\n{detail}", entry)
        return entry

    def output_files(self, entry: dict) -> list[Path]:
        """Paths of the files a finished prompt saved (images/videos listed in its outputs)."""
        roots = {"output": self.base_dir / "output", "temp": self.base_dir / "temp", "input": self.base_dir / "input"}
        files = []
        for node_out in entry.get("outputs", {}).values():
            for items in node_out.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and "filename" in item and item.get("type") in roots:
                        files.append(roots[item["type"]] / item.get("subfolder", "") / item["filename"])
        return files


class EventStream:
    """ComfyUI's ``/ws`` event stream (JSON text frames: progress, executing, execution_* ...).

    A minimal RFC 6455 client over a plain socket, so the integration tests need no websocket package.
    Binary frames (preview images) are skipped; the server's frames are never fragmented or masked.
    """

    def __init__(self, host: str, port: int, client_id: str, timeout: float = 60):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ComfyError(f"websocket upgrade refused: {head[:200]!r}")

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the websocket")
        self._buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)  # client frames must be masked
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def next_event(self) -> dict:
        """The next JSON event ``{"type": ..., "data": ...}``; raises socket.timeout when none comes in time."""
        while True:
            b0, b1 = self._take(2)
            opcode, length = b0 & 0x0F, b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._take(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._take(8))[0]
            payload = self._take(length)
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                raise ConnectionError("the server closed the websocket")
            if opcode == 0x9:
                self._send(0xA, payload)  # pong

    def close(self) -> None:
        self.sock.close()


REPO_ROOT = Path(__file__).resolve().parents[2]


# The start of a script for ``run_in_comfy_python`` that needs ComfyUI's modules and this pack: ComfyUI on the CPU,
# then the pack imported as ComfyUI imports it (a package named by its folder, nodes imported relatively).
# For scripts run in ComfyUI's Python before they import the pack (which copies its example inputs into the input
# folder): ComfyUI's writable folders in the script's temporary folder, so nothing is written into the checkout.
FOLDERS_TO_TEMP = r"""
import folder_paths, tempfile
for _name in ("user", "input", "output", "temp"):
    getattr(folder_paths, f"set_{_name}_directory")(tempfile.mkdtemp(prefix=_name + "_"))
"""

PACK_IMPORT_SCRIPT = (
    r"""
import importlib.util, json, sys, tempfile
sys.argv = [sys.argv[0], "--cpu"]  # comfy.model_management parses ComfyUI's command line on import
sys.path[:0] = [COMFYUI_PATH]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.sample, comfy.samplers
"""
    + FOLDERS_TO_TEMP
    + r"""sys.path.insert(0, REPO)
from tests.tiny_checkpoint import write_tiny_checkpoint
sys.path.remove(REPO)  # the checkout's nodes/ must not shadow ComfyUI's nodes module
spec = importlib.util.spec_from_file_location("easyanimate_pack", REPO + "/__init__.py",
                                              submodule_search_locations=[REPO])
pack = importlib.util.module_from_spec(spec)
sys.modules["easyanimate_pack"] = pack
spec.loader.exec_module(pack)
"""
)


def run_in_comfy_python(script: str, skip_reason: str) -> dict:
    """Run ``script`` in ComfyUI's Python (COMFYUI_PYTHON) and return the JSON its last line prints.

    The script sees COMFYUI_PATH and REPO (this repository) as globals. Skips with ``skip_reason``
    when COMFYUI_PATH is unset; a failing script fails the test with the end of its stderr.
    """
    import pytest

    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip(skip_reason)
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    prelude = f"COMFYUI_PATH = {comfy_path!r}\nREPO = {str(REPO_ROOT)!r}\n"
    # No bytecode written into the checkout, and the script's temporary folders (tempfile) removed afterwards.
    with tempfile.TemporaryDirectory(prefix="easyanimate_script_") as tmp:
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TMPDIR=tmp)
        proc = subprocess.run(
            [python, "-c", prelude + script], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
