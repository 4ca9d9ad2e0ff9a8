"""Time `easyanimate train`'s dataset checks for a synthetic dataset: on first start and on resume.

    python bench/bench_startup_checks.py [--clips 10000] [--workers N] [--work DIR]

Writes ``--clips`` distinct tiny mp4 videos (9 frames, 32x32; each its own file, as in a real dataset) and the
official metadata JSON, then runs the checks training runs before it loads a weight (``load_dataset``: every
entry read, every file probed) twice, as ``train`` does: the first start probes every file in ``--workers``
threads and keeps the results in a probe cache (``dataset_probes.json`` in the output folder), a resume reads
the cache and probes only files whose size or mtime changed (none here). For comparison it times the probe the
trainer used before (two ffmpeg runs a clip, one clip at a time) on a sample and extrapolates it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from easyanimate_core.training.dataset import ProbeCache, load_dataset  # noqa: E402
from easyanimate_core.video_io import write_video  # noqa: E402


def write_synthetic_dataset(folder: Path, clips: int) -> Path:
    """``clips`` mp4 files (copies of one tiny video, each its own file) and their metadata JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    template = folder / "template.mp4"
    write_video(template, torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(0)))
    entries = []
    for i in range(clips):
        name = f"clips/{i // 1000:02d}/clip_{i:05d}.mp4"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, folder / name)
        entries.append({"file_path": name, "text": f"synthetic clip {i}", "type": "video"})
    metadata = folder / "metadata.json"
    metadata.write_text(json.dumps(entries))
    return metadata


def old_probe_seconds(metadata: Path, sample: int) -> float:
    """Seconds a clip took with the trainer's earlier probe (frame count and size: two ffmpeg runs, serially)."""
    import imageio.v3 as iio
    import imageio_ffmpeg

    entries = json.loads(metadata.read_text())[:sample]
    started = time.perf_counter()
    for entry in entries:
        path = metadata.parent / entry["file_path"]
        imageio_ffmpeg.count_frames_and_secs(str(path))
        iio.immeta(path, plugin="FFMPEG")
    return (time.perf_counter() - started) / len(entries)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=10_000, help="videos in the synthetic dataset (default: 10000)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="probe threads (default: the CPU count)")
    p.add_argument("--work", help="folder for the dataset and cache (default: a temporary folder, removed after)")
    p.add_argument("--old-sample", type=int, default=50, help="clips timed with the earlier probe (default: 50)")
    args = p.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_startup_"))
    try:
        started = time.perf_counter()
        metadata = write_synthetic_dataset(work / "data", args.clips)
        print(f"wrote {args.clips} clips in {time.perf_counter() - started:.1f} s; {args.workers} probe threads")
        cache_file = work / "output" / "dataset_probes.json"
        for run in ("first start", "resume"):
            probes = ProbeCache(cache_file)
            started = time.perf_counter()
            samples = load_dataset(metadata, probes=probes, log=lambda _: None, workers=args.workers)
            if probes.probed:
                probes.save()
            seconds = time.perf_counter() - started
            print(f"{run}: {len(samples)} samples checked in {seconds:.1f} s ({probes.probed} files probed)")
        old = old_probe_seconds(metadata, min(args.old_sample, args.clips))
        print(
            f"earlier probe, one clip at a time: {old:.3f} s a clip -> {old * args.clips / 60:.1f} min for "
            f"{args.clips} clips, on every start and resume"
        )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
