"""Atomic file and folder writes: a temporary name beside the target, renamed into place when complete.

    with atomic_path(target) as tmp:   write the file at ``tmp``; it becomes ``target`` only if the block succeeds
    with atomic_dir(target) as tmp:    the same for a folder (an existing ``target`` folder is replaced whole)
    with scratch_dir(target) as tmp:   a temporary folder beside ``target``, always removed (the caller moves
                                       what it wants to keep)

An exception or Ctrl-C inside the block removes the temporary file or folder; a killed process can leave
one behind (named ``.<name>.partial-*``), never a half-written ``target``. ``remove_partials(folder)``
clears such leftovers.

The temporary file or folder gets the permissions a plain ``open`` / ``mkdir`` would give (0666 / 0777 less
the umask), not mkstemp's private 0600 / 0700: a LoRA or video we write must be readable by whoever the
user's umask lets read it (a ComfyUI running as another user, say).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL_MARK = ".partial-"


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; rename it to ``target`` when the block ends without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The suffix stays last: some writers (ffmpeg) pick the format from the file name.
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{PARTIAL_MARK}", suffix=target.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # Set once written: some writers (safetensors) create the file anew, 0600 whatever the umask.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def scratch_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` (named as a partial write of it); removed when the block ends."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{PARTIAL_MARK}"))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it replaces ``target`` when the block ends without error."""
    target = Path(target)
    with scratch_dir(target) as tmp:
        yield tmp
        if target.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)


def remove_partials(folder: str | Path) -> int:
    """Delete the temporary files and folders that killed writes left in ``folder``; return how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and PARTIAL_MARK in p.name]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return len(stale)
