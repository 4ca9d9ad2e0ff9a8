"""The run of ``easyanimate prepare``: every stage in order over what the earlier ones kept, results recorded as
they finish, then the dataset JSON and a summary of what each stage dropped and why.

    Plan                                 what a run does (built and checked by command.py)
    LocalExecutor(workers)               runs a stage's items: in this process, or in a pool of worker processes
    run_plan(plan, executor) -> Summary  the run (the Ray executor in ray_runner.py plugs in the same way)
    format_summary(summary) -> str       the table printed at the end

Resume: a stage runs only the items without a finished record (``records.py``), so a killed run, rerun with the
same command, redoes nothing that finished. Verdicts are recomputed every run from the stored results with this
run's thresholds. The dataset lists the kept clips in a fixed order (sources in natural order, then scene and
piece), whatever order the workers finished in.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ...atomic import atomic_path
from .captions import CaptionTable, apply_template
from .records import OutputFolder
from .stages import SplitStage, run_batch, run_item


@dataclass
class Plan:
    """Everything one run needs; every input in it has been checked."""

    source_root: Path  # the SRC folder (a single SRC file: its folder)
    sources: list[str]  # video paths relative to source_root, in natural order
    out: OutputFolder
    split: SplitStage
    stages: list  # clip filter stages, in order
    captions: CaptionTable
    caption_stage: object | None  # CaptionStage or None
    template: str
    settings: dict  # {"split": {flag: value}, "scores": {stage: {flag: value}}}: the manifest's
    off: dict[str, str] = field(default_factory=dict)  # filter stage -> why it does not run this time


@dataclass
class StageRow:
    """One line of the summary."""

    stage: str
    unit: str
    seen: int = 0  # items that reached the stage
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)  # drop reason -> count
    done_before: int = 0  # results taken from an earlier run
    computed: int = 0  # results computed in this run
    seconds: float = 0.0  # time computing them
    note: str = ""
    off: bool = False  # the stage did not run (``note`` says why)

    @property
    def dropped(self) -> int:
        """Items dropped (for split: segments and unreadable videos; its input and output differ in kind)."""
        return sum(self.reasons.values())


@dataclass
class Summary:
    """What a run did: the rows of the summary table and the dataset written."""

    rows: list[StageRow]
    dataset: Path
    entries: int


# --------------------------------------------------------------------------------------------------
# Executing a stage's items
# --------------------------------------------------------------------------------------------------


def _score_pair(stage, item: dict) -> tuple[dict, dict]:
    """(item, result) in a worker process (the pool returns results in finishing order)."""
    return item, run_item(stage, item)


def _init_worker() -> None:
    """One thread per worker process for OpenCV and torch: the processes are the parallelism."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class LocalExecutor:
    """Runs the items of a stage on this machine: CPU stages in ``workers`` processes (in this one for 1), model
    stages in this process in batches (one copy of the model)."""

    def __init__(self, workers: int = 1):
        self.workers = workers
        self._pool = None

    def map(self, stage, items: list[dict]) -> Iterator[tuple[dict, dict]]:
        """(item, result) for every item, in finishing order."""
        if stage.model:
            scorer = stage.load()
            for start in range(0, len(items), stage.batch_size):
                batch = items[start : start + stage.batch_size]
                yield from zip(batch, run_batch(scorer, batch), strict=True)
        elif self.workers <= 1 or len(items) <= 1:
            for item in items:
                yield item, run_item(stage, item)
        else:
            yield from self._get_pool().imap_unordered(partial(_score_pair, stage), items)

    def _get_pool(self):
        """The worker pool, started on first use (forkserver: no locks or threads of this process are inherited)."""
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            self._pool = context.Pool(self.workers, initializer=_init_worker)
        return self._pool

    def close(self) -> None:
        """Stop the workers (a stage interrupted mid-way leaves nothing running)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def natural_key(text: str) -> list:
    """Sort key putting "clip2" before "clip10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _progress(total: int, name: str, unit: str, enabled: bool):
    """A tqdm bar on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{name:<11}", unit=unit, disable=not enabled or total == 0, file=sys.stderr)


def _execute(stage, todo: list[dict], records, key: str, executor, row: StageRow, progress: bool) -> None:
    """Run ``stage`` on ``todo`` and record each result as it arrives."""
    started = time.perf_counter()
    with _progress(len(todo), stage.name, "clip" if key == "clip" else "video", progress) as bar:
        for item, result in executor.map(stage, todo):
            records.append({key: item[key], **result})
            row.computed += 1
            bar.update(1)
    row.seconds = time.perf_counter() - started


def run_plan(plan: Plan, executor, progress: bool = True) -> Summary:
    """Run every stage of ``plan`` with ``executor``, write the dataset JSON and return the summary."""
    out = plan.out
    rows = []
    sources = [{"source": rel, "path": str(plan.source_root / rel)} for rel in plan.sources]

    # Split (and the resolution check that comes before it).
    split, records = plan.split, out.records("split")
    todo = [s for s in sources if split.needs_run(records.get(s["source"]))]
    split_row = StageRow("split", "videos -> clips", seen=len(sources), done_before=len(sources) - len(todo))
    _execute(split, todo, records, "source", executor, split_row, progress)
    resolution_row = StageRow("resolution", "videos", seen=len(sources))
    clips = []
    split_row.seen = 0
    for source in sources:
        record = records.get(source["source"])
        if "error" in record:
            resolution_row.kept += 1
            split_row.seen += 1
            split_row.reasons[f"unreadable: {record['error']}"] += 1
            continue
        problem = split.resolution_verdict(record)
        if problem:
            resolution_row.reasons[problem] += 1
            continue
        resolution_row.kept += 1
        split_row.seen += 1
        items = split.clip_items(source["source"], record)
        clips += items
        for *_, reason in record.get("dropped", []):
            split_row.reasons[f"segment {reason}"] += 1
    split_row.kept = len(clips)
    split_row.note = f"{split_row.seen} videos -> {len(clips)} clips"
    rows += [resolution_row, split_row]

    # Clip filters, each over what the previous ones kept.
    alive = clips
    for stage in plan.stages:
        alive = _run_filter(stage, alive, out, executor, rows, progress)
    rows += [StageRow(name, "clips", note=f"off: {why}", off=True) for name, why in plan.off.items()]

    # Captions: written ones first, the model for the rest.
    entries = _caption(plan, alive, executor, rows, progress)
    with atomic_path(out.dataset) as tmp:
        tmp.write_text(json.dumps(entries, indent=1, ensure_ascii=False), encoding="utf-8")
    return Summary(rows, out.dataset, len(entries))


def _run_filter(stage, alive: list[dict], out: OutputFolder, executor, rows: list, progress: bool) -> list[dict]:
    """Run one clip stage where it has no result yet; the clips it keeps."""
    records = out.records(stage.name)
    todo = [clip for clip in alive if not records.finished(clip["clip"])]
    row = StageRow(stage.name, "clips", seen=len(alive), done_before=len(alive) - len(todo))
    _execute(stage, todo, records, "clip", executor, row, progress)
    kept = []
    for clip in alive:
        record = records.get(clip["clip"])
        reason = f"error: {record['error']}" if "error" in record else stage.verdict(record)
        if reason:
            row.reasons[reason] += 1
        else:
            kept.append(clip)
    row.kept = len(kept)
    rows.append(row)
    return kept


def _caption(plan: Plan, alive: list[dict], executor, rows: list, progress: bool) -> list[dict]:
    """The dataset entries of the clips that get a caption; the caption row of the summary."""
    row = StageRow("caption", "clips", seen=len(alive))
    written = {
        c["clip"]: plan.captions.lookup(str(plan.source_root / c["source"]), c["source"], c["clip"]) for c in alive
    }
    model_records = None
    if plan.caption_stage is not None:
        model_records = plan.out.records("caption")
        wanted = [c for c in alive if written[c["clip"]] is None]
        todo = [c for c in wanted if not model_records.finished(c["clip"])]
        row.done_before = len(wanted) - len(todo)
        _execute(plan.caption_stage, todo, model_records, "clip", executor, row, progress)
    entries, sources = [], Counter()
    for clip in alive:
        caption = written[clip["clip"]]
        if caption is None and model_records is not None:
            record = model_records.get(clip["clip"])
            reason = f"error: {record['error']}" if "error" in record else plan.caption_stage.verdict(record)
            if reason:
                row.reasons[reason] += 1
                continue
            caption = (record["caption"], "model")
        if caption is None:
            row.reasons["no caption (no sidecar .txt / --captions entry, no --caption-model)"] += 1
            continue
        sources[caption[1]] += 1
        entries.append({"file_path": clip["clip"], "text": apply_template(plan.template, caption[0]), "type": "video"})
    row.kept = len(entries)
    row.note = ", ".join(f"{n} from {where}" for where, n in sorted(sources.items()))
    rows.append(row)
    return entries


def format_summary(summary: Summary) -> str:
    """The summary table: per stage, what came in, what was kept, what was dropped and why."""
    lines = [f"{'stage':<12}{'in':>7}{'kept':>7}{'dropped':>9}  why / note"]
    for row in summary.rows:
        if row.off:
            lines.append(f"{row.stage:<12}{'-':>7}{'-':>7}{'-':>9}  {row.note}")
            continue
        why = [f"{n} {reason}" for reason, n in row.reasons.most_common()]
        if row.note:
            why.append(row.note)
        if row.done_before:
            why.append(f"{row.done_before} done in an earlier run")
        lines.append(f"{row.stage:<12}{row.seen:>7}{row.kept:>7}{row.dropped:>9}  {'; '.join(why)}")
    lines.append(f"wrote {summary.dataset} ({summary.entries} clips)")
    return "\n".join(lines)
