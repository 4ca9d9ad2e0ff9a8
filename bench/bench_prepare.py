"""Throughput of `easyanimate prepare` on this machine: each stage and end to end, for several worker counts.

    python bench/bench_prepare.py [--videos 6] [--size 640x360] [--fps 24] [--workers 1 2] [--work DIR] [--ray]

Writes ``--videos`` synthetic source videos (tests/prepare_footage.py scenes at ``--size``: per video a moving,
a static, a lettered and a fast scene of 4-6 s joined by hard cuts), then runs the whole pipeline (split, duration,
text, motion, sidecar captions; the model stages need model folders and are left out) once per ``--workers``
value into a fresh output folder, and prints per stage the items computed, the seconds spent and the rate, and the
end-to-end clips/s (clips cut / wall time of the run, start-up included). ``--ray`` adds one run on a local Ray
instance with the largest worker count.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate_core.training.prepare.command import add_prepare_arguments, build_run  # noqa: E402
from easyanimate_core.training.prepare.pipeline import run_plan  # noqa: E402
from tests.prepare_footage import Scene, write_footage  # noqa: E402

TINTS = [(255, 90, 90), (90, 255, 90), (90, 140, 255), (255, 255, 90), (255, 90, 255), (90, 255, 255)]


def write_sources(folder: Path, videos: int, width: int, height: int, fps: float) -> float:
    """``videos`` source videos with four scenes each and a sidecar caption; their total length in seconds."""
    seconds = 0.0
    for v in range(videos):
        lengths = [round(fps * (4 + (v + i) % 3)) for i in range(4)]  # 4-6 s scenes
        scenes = [
            Scene("moving", lengths[0], TINTS[v % 6], 10 * v + 1),
            Scene("static", lengths[1], TINTS[(v + 1) % 6], 10 * v + 2),
            Scene("moving", lengths[2], TINTS[(v + 2) % 6], 10 * v + 3, text="TEXT"),
            Scene("fast", lengths[3], TINTS[(v + 3) % 6], 10 * v + 4),
        ]
        write_footage(folder / f"video_{v:02d}.mp4", scenes, fps, width, height)
        (folder / f"video_{v:02d}.txt").write_text(f"synthetic video {v}")
        seconds += sum(lengths) / fps
    return seconds


def run_once(source: Path, out: Path, extra: list[str]) -> tuple[float, object]:
    """(wall seconds, summary) of one prepare run into a fresh ``out``."""
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args([str(source), "--out", str(out), "--min-pixels", "0", "--no-progress", *extra])
    started = time.perf_counter()
    plan, executor, stop = build_run(args)
    try:
        plan.out.start(source.resolve(), plan.settings)
        summary = run_plan(plan, executor, progress=False)
    finally:
        executor.close()
        plan.out.close()
        stop()
    return time.perf_counter() - started, summary


def report(label: str, wall: float, summary) -> None:
    """Print the per-stage rates and the end-to-end rate of one run."""
    rows = {row.stage: row for row in summary.rows}
    clips = rows["split"].kept
    print(
        f"\n{label}: {clips} clips cut, {summary.entries} in the dataset, {wall:.1f} s wall, {clips / wall:.2f} clips/s"
    )
    print(f"  {'stage':<10}{'items':>7}{'seconds':>9}{'items/s':>9}")
    for row in summary.rows:
        if row.computed:
            unit = "videos" if row.stage == "split" else "clips"
            rate = row.computed / row.seconds if row.seconds else float("inf")
            print(f"  {row.stage:<10}{row.computed:>7}{row.seconds:>9.2f}{rate:>9.2f}  {unit}/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--size", default="640x360", help="WIDTHxHEIGHT of the source videos")
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ray", action="store_true", help="also one run on a local Ray instance")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    source = work / "videos"
    try:
        source.mkdir(parents=True, exist_ok=True)
        seconds = write_sources(source, args.videos, width, height, args.fps)
        print(f"{args.videos} source videos, {width}x{height} at {args.fps:g} fps, {seconds:.0f} s of footage")
        runs = [(f"--workers {w}", ["--workers", str(w)]) for w in args.workers]
        if args.ray:
            runs.append((f"--ray --workers {max(args.workers)}", ["--ray", "--workers", str(max(args.workers))]))
        for label, extra in runs:
            out = work / f"out_{len(list(work.iterdir()))}"
            wall, summary = run_once(source, out, extra)
            report(label, wall, summary)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
