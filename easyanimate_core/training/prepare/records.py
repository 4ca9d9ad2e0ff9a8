"""The output folder of ``easyanimate prepare``: its manifest, the per-stage record files, resume.

    OUT/prepare.json            manifest: marks the folder as ours; the source and the settings the records hold
    OUT/clips/...               the clips cut from the sources (mirroring the source folders)
    OUT/records/<stage>.jsonl   one JSON object per source (split) or clip (every other stage), appended as each
                                finishes: scores, or {"error": ...} for an item that failed (retried on resume)
    OUT/metadata.json           the dataset `easyanimate train --data` reads, rewritten at the end of each run

    check_output(out, source, settings) -> "new" | "resume"   ValueError before any work if --out is not usable
    OutputFolder(out).start(source, settings)                 create / update the manifest, clear partial files
    OutputFolder(out).records(stage) -> RecordFile

Settings are keyed by the flag that sets them, so a resume with a changed one is refused naming that flag: the
records were computed with the old value. Thresholds are not settings: every run decides from the stored scores
with the thresholds it is given, so they may change between runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...atomic import atomic_path, remove_partials

MANIFEST = "prepare.json"
FORMAT = "easyanimate-prepare"
VERSION = 1
DATASET = "metadata.json"


def read_manifest(out: Path) -> dict | None:
    """The manifest of a prepare output folder, or None if ``out`` holds none of ours."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def check_output(out: Path, source: Path, settings: dict) -> str:
    """ "new" (absent or empty folder) or "resume" (an earlier prepare run of ``source`` with the same settings).

    ``settings``: {"split": {flag: value}, "scores": {stage: {flag: value}}}. ValueError names the flag to fix.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; give a folder (a new one, or an earlier prepare output to resume)")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    manifest = read_manifest(out)
    if manifest is None:
        raise ValueError(
            f"--out {out}: the folder is not empty and is not the output of `easyanimate prepare` (no {MANIFEST}); "
            "choose a new or empty folder (nothing in it is deleted or overwritten)"
        )
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"--out {out}: written by another version of prepare ({manifest.get('version')}); use a new folder"
        )
    if Path(manifest.get("source", "")) != source:
        raise ValueError(
            f"--out {out}: holds the preparation of {manifest.get('source')}, not of {source}; give that source to "
            "resume it, or choose a new --out"
        )
    changed = _changed(manifest.get("split", {}), settings["split"])
    for stage, flags in settings["scores"].items():
        changed += _changed(manifest.get("scores", {}).get(stage, flags), flags)
    if changed:
        listed = "; ".join(f"{flag} was {old!r}, now {new!r}" for flag, old, new in changed)
        raise ValueError(
            f"--out {out}: an earlier run there used other settings ({listed}); its clips and scores depend on them. "
            "Rerun with the earlier values to resume, or choose a new --out"
        )
    return "resume"


def _changed(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(flag, old, new) for every flag whose value differs between two settings dicts."""
    return [
        (flag, old.get(flag), new.get(flag)) for flag in sorted(set(old) | set(new)) if old.get(flag) != new.get(flag)
    ]


class RecordFile:
    """One stage's results: a JSON-lines file, one object per item, keyed by ``key`` (the last line for a key wins).

    Each result is one ``os.write`` of a whole line to a file opened for appending, made as the item finishes, so
    a killed run loses at most the line being written; a torn last line (no newline) is cut off when the file is
    opened again. Only the main process writes (workers return their results to it).
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.entries: dict[str, dict] = {}
        self._fd: int | None = None
        if path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a kill can leave a last line without its newline
        for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
            try:
                entry = json.loads(line)
                self.entries[entry[self.key]] = entry
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{self.path} line {number}: not a record ({e}); delete the file to redo that stage"
                ) from e
        if len(complete) != len(data):
            os.truncate(self.path, len(complete))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> dict | None:
        """The record of ``key``, or None."""
        return self.entries.get(key)

    def finished(self, key: str) -> bool:
        """Whether ``key`` has a record that is not an error (errors are retried)."""
        entry = self.entries.get(key)
        return entry is not None and "error" not in entry

    def append(self, entry: dict) -> None:
        """Record ``entry`` (it holds the key) now, as one line."""
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        line = (json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        written = 0
        while written < len(line):
            written += os.write(self._fd, line[written:])
        self.entries[entry[self.key]] = entry

    def close(self) -> None:
        """Close the file (records stay readable)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class OutputFolder:
    """The files of one prepare output folder (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        self.clips = root / "clips"
        self.dataset = root / DATASET
        self._records: dict[str, RecordFile] = {}

    def start(self, source: Path, settings: dict) -> None:
        """Write (or update) the manifest and remove the partial files a killed run left under clips/."""
        manifest = read_manifest(self.root) or {"format": FORMAT, "version": VERSION, "source": str(source)}
        manifest["split"] = settings["split"]
        manifest["scores"] = {**manifest.get("scores", {}), **settings["scores"]}
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        remove_partials(self.root)
        if self.clips.is_dir():
            for folder, _, _ in os.walk(self.clips):
                remove_partials(folder)

    def records(self, stage: str) -> RecordFile:
        """The record file of ``stage`` (split records are keyed by source, the others by clip)."""
        if stage not in self._records:
            key = "source" if stage == "split" else "clip"
            self._records[stage] = RecordFile(self.root / "records" / f"{stage}.jsonl", key)
        return self._records[stage]

    def close(self) -> None:
        """Close every record file."""
        for records in self._records.values():
            records.close()
