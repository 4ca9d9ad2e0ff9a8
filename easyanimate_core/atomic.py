"""Atomic file and folder writes: a temporary name beside the target, renamed into place when complete.

    with atomic_path(target) as tmp:   write the file at ``tmp``; it becomes ``target`` only if the block succeeds
    with atomic_dir(target) as tmp:    the same for a folder (an existing ``target`` folder is replaced whole)

An exception or Ctrl-C inside the block removes the temporary file or folder; a killed process can leave
one behind (named ``.<name>.partial-*``), never a half-written ``target``. ``remove_partials(folder)``
clears such leftovers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL_MARK = ".partial-"


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; rename it to ``target`` when the block ends without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{PARTIAL_MARK}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it replaces ``target`` when the block ends without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{PARTIAL_MARK}"))
    try:
        yield tmp
        if target.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_partials(folder: str | Path) -> int:
    """Delete the temporary files and folders that killed writes left in ``folder``; return how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and PARTIAL_MARK in p.name]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return len(stale)
