"""Training data: the official metadata JSON, checked before training, bucketed by aspect ratio and frame count.

    load_dataset(json_path, data_root=None, min_frames=5, skip_bad=False, probes=None) -> [Sample]
    ProbeCache(json_file)              probe results kept by file size and mtime (resume re-probes nothing)
    BucketRule(resolutions, max_frames, token_budget).bucket(sample) -> Bucket (frames, height, width)
    batch_plan(buckets, batch_size, seed) -> endless (epoch, [sample positions]) sharing one bucket
    load_clip(sample, bucket, stride, generator) -> [3, F, H, W] in [-1, 1]

The metadata file is the official one (spec §6.3): a JSON list of ``{"file_path", "text", "type"}`` with
``type`` "video" or "image" and paths relative to the data root (default: the JSON's folder) or absolute.
A video may also be a folder of frames. Every entry is checked before training (file present and readable,
enough frames, a caption, a known type); the problems are reported together, each with its JSON index.

Buckets follow the official sampler: each sample goes to the closest aspect ratio of the 512-base table scaled
to a training resolution, sides snapped down to 16. With several ``resolutions`` a sample trains at the largest
one below 1.25 x its mean side (the official rule, taken deterministically). Video clips get as many frames as
the token budget allows at that size (latent frames x (H/16) x (W/16) transformer tokens), at most
``max_frames`` and at most what the video has, snapped to the VAE's 4k+1; images are one frame.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..pipeline import ASPECT_RATIO_512

KINDS = ("video", "image")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SIZE_MULTIPLE = 16  # pixel sides of buckets (VAE 8 x patch 2)
PROBE_CACHE = "dataset_probes.json"  # in a run's output folder: probe results by file size and mtime
TEMPORAL_COMPRESSION = 4  # mag VAE: 4k+1 frames -> k+1 latent frames


@dataclass(frozen=True)
class Sample:
    """One checked entry of the metadata file."""

    index: int  # position in the JSON list (named in every report)
    path: Path
    text: str
    kind: str  # "video" or "image"
    frames: int  # frames in the file (1 for an image)
    height: int
    width: int


@dataclass(frozen=True, order=True)
class Bucket:
    """The pixel size every sample of a batch is cropped to."""

    frames: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        """Transformer tokens of a clip of this size (latent frames x patches)."""
        latent_frames = (self.frames - 1) // TEMPORAL_COMPRESSION + 1
        return latent_frames * (self.height // SIZE_MULTIPLE) * (self.width // SIZE_MULTIPLE)


# --------------------------------------------------------------------------------------------------
# Reading and checking the metadata
# --------------------------------------------------------------------------------------------------


def read_metadata(json_path: str | Path) -> list:
    """The metadata file's list of entries; ValueError if it is not a JSON list."""
    json_path = Path(json_path)
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the dataset metadata {json_path}: {e}") from e
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: expected a JSON list of {{file_path, text, type}} objects")
    return entries


_FFMPEG_FRAMES = re.compile(r"^frame=\s*(\d+)", re.MULTILINE)
_FFMPEG_SIZE = re.compile(r"Stream #0:\d+.*?: Video: .*?, (\d+)x(\d+)[,\s\[]")


def _probe_video(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of a video file or a folder of frames; a file's frames are decoded and counted
    (container frame counts can be wrong) in one ffmpeg run, which also reports the size."""
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError("unreadable video: the folder holds no images")
        with Image.open(files[0]) as im:
            return len(files), im.height, im.width
    import subprocess

    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-i", str(path)]
    command += ["-map", "0:v:0", "-vf", "null", "-f", "null", "-"]
    report = subprocess.run(command, capture_output=True, text=True, errors="replace").stderr
    frames, size = _FFMPEG_FRAMES.findall(report), _FFMPEG_SIZE.search(report)
    if not frames or not size:
        last = report.strip().splitlines()[-1] if report.strip() else "ffmpeg said nothing"
        raise ValueError(f"unreadable video ({last})")
    return int(frames[-1]), int(size.group(2)), int(size.group(1))


def _probe_image(path: Path) -> tuple[int, int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
            return 1, im.height, im.width
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"unreadable image ({e})") from e


def check_entry(index: int, entry, data_root: Path, min_frames: int, probes: ProbeCache | None = None) -> Sample:
    """A Sample for one metadata entry; ValueError saying what is wrong with it."""
    if not isinstance(entry, dict):
        raise ValueError("not an object with file_path, text and type")
    kind = entry.get("type", "image")
    if kind not in KINDS:
        raise ValueError(f"unknown type {kind!r} (valid: {', '.join(KINDS)})")
    text = entry.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty caption (text)")
    file_path = entry.get("file_path")
    if not isinstance(file_path, str) or not file_path:
        raise ValueError("no file_path")
    path = Path(file_path).expanduser()
    path = path if path.is_absolute() else data_root / path
    if not path.exists():
        raise ValueError(f"missing file {path}")
    frames, height, width = probes.get(kind, path) if probes else probe(kind, path)
    if kind == "video" and frames < min_frames:
        raise ValueError(f"too short: {frames} frames, at least {min_frames} needed (--min-frames)")
    return Sample(index, path, text.strip(), kind, frames, height, width)


def probe(kind: str, path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of a video (file or folder of frames) or an image; ValueError if unreadable."""
    return _probe_video(path) if kind == "video" else _probe_image(path)


class ProbeCache:
    """Probe results kept in a JSON file, keyed by kind and path and valid while the file's size and mtime are
    unchanged: a resumed or repeated run re-probes only new or changed files (ffmpeg decodes each video).

    ``prefetch`` probes many files at once in threads (each video probe is an ffmpeg process); ``get`` answers
    from the cache, probing on a miss. Unreadable files are not cached (they are re-checked every start).
    """

    VERSION = 1

    def __init__(self, path: Path | None = None):
        self.path = path
        self.entries: dict[str, list] = {}
        self.probed = 0  # files probed (not answered from the cache) by this object
        self._lock = threading.Lock()  # prefetch's threads count and store together
        if path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                if saved.get("version") == self.VERSION:
                    self.entries = saved["probes"]
            except (OSError, ValueError, KeyError, AttributeError):
                self.entries = {}  # a damaged cache is only a slower start

    @staticmethod
    def _key(kind: str, path: Path) -> str:
        return f"{kind}:{os.path.abspath(path)}"

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def get(self, kind: str, path: Path) -> tuple[int, int, int]:
        key, stamp = self._key(kind, path), self._stamp(path)
        saved = self.entries.get(key)
        if saved is not None and saved[:2] == stamp:
            return tuple(saved[2:])
        result = probe(kind, path)
        with self._lock:
            self.probed += 1
            self.entries[key] = [*stamp, *result]
        return result

    def prefetch(
        self, items: list[tuple[str, Path]], workers: int, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Probe the uncached ``items`` (kind, path) with ``workers`` threads, calling ``progress(done, total)``
        as they finish; failures are left to ``get``, which raises them."""
        from concurrent.futures import ThreadPoolExecutor

        def probe_quietly(item):
            try:
                self.get(*item)
            except (ValueError, OSError):
                pass

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for done, _ in enumerate(pool.map(probe_quietly, items), 1):
                if progress:
                    progress(done, len(items))

    def save(self) -> None:
        if self.path is not None:
            from .files import write_json

            write_json(self.path, {"version": self.VERSION, "probes": self.entries})


def entry_path(entry, data_root: Path) -> tuple[str, Path] | None:
    """(kind, file) of a well-formed entry whose file exists, else None (``check_entry`` says what is wrong)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file_path"), str) or not entry["file_path"]:
        return None
    path = Path(entry["file_path"]).expanduser()
    path = path if path.is_absolute() else data_root / path
    return (entry.get("type", "image"), path) if path.exists() else None


def load_dataset(
    json_path: str | Path,
    data_root: str | Path | None = None,
    min_frames: int = 5,
    skip_bad: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
    probes: ProbeCache | None = None,
    workers: int | None = None,
) -> list[Sample]:
    """Read and check every entry; ValueError listing every bad one (with its JSON index) unless ``skip_bad``.

    Files are probed in ``workers`` threads (default: the CPU count) through ``probes`` (a ProbeCache: pass
    one read from a file, and save it after, to skip unchanged files on the next start); ``progress(done, total)``
    follows the files.
    """
    json_path = Path(json_path)
    root = Path(data_root).expanduser() if data_root is not None else json_path.parent
    entries = read_metadata(json_path)
    probes = probes if probes is not None else ProbeCache()
    wanted = [item for item in (entry_path(e, root) for e in entries) if item and item[0] in KINDS]
    probes.prefetch(wanted, workers or os.cpu_count() or 1, progress)
    samples, problems = [], []
    for index, entry in enumerate(entries):
        try:
            samples.append(check_entry(index, entry, root, min_frames, probes))
        except ValueError as e:
            name = entry.get("file_path") if isinstance(entry, dict) else None
            problems.append(f"  #{index}{f' ({name})' if name else ''}: {e}")
    if problems and not skip_bad:
        raise ValueError(
            f"{len(problems)} of {len(entries)} entries in {json_path} cannot be used:\n"
            + "\n".join(problems)
            + "\nFix them, or pass --skip-bad-samples to train without them."
        )
    if problems:
        log(f"skipping {len(problems)} bad samples of {len(entries)}:\n" + "\n".join(problems))
    if not samples:
        raise ValueError(f"{json_path}: no usable samples")
    return samples


# --------------------------------------------------------------------------------------------------
# Buckets and batches
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketRule:
    """How samples map to training sizes: resolutions (base sides), frame cap and token budget."""

    resolutions: tuple[int, ...]
    max_frames: int
    token_budget: int

    def __post_init__(self):
        bad = [r for r in self.resolutions if r < SIZE_MULTIPLE or r % SIZE_MULTIPLE]
        if not self.resolutions or bad:
            raise ValueError(
                f"--resolutions {' '.join(map(str, bad))}: base sides must be multiples of {SIZE_MULTIPLE}, e.g. 512"
            )
        if self.max_frames < 1 or (self.max_frames - 1) % TEMPORAL_COMPRESSION:
            nearest = max(1, (self.max_frames - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1)
            raise ValueError(f"--frames {self.max_frames}: must be 4k+1 (1, 5, 9, ... 49); nearest valid: {nearest}")

    def resolution(self, sample: Sample) -> int:
        """The largest resolution below 1.25 x the sample's mean side (the smallest if none is)."""
        mean_side = (sample.height + sample.width) / 2
        fitting = [r for r in self.resolutions if r < mean_side * 1.25]
        return max(fitting) if fitting else min(self.resolutions)

    def bucket(self, sample: Sample) -> Bucket:
        """The training size of ``sample``."""
        scale = self.resolution(sample) / 512
        ratio = min(ASPECT_RATIO_512, key=lambda r: abs(float(r) - sample.height / sample.width))
        height, width = (
            max(SIZE_MULTIPLE, int(x * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE) for x in ASPECT_RATIO_512[ratio]
        )
        if sample.kind == "image":
            return Bucket(1, height, width)
        per_frame = (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)
        latent_frames = max(1, self.token_budget // per_frame)
        frames = min(
            (latent_frames - 1) * TEMPORAL_COMPRESSION + 1,
            self.max_frames,
            (sample.frames - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1,
        )
        return Bucket(frames, height, width)


def batch_plan(buckets: list[Bucket], batch_size: int, seed: int) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, batch) pairs; a batch holds ``batch_size`` positions of ``buckets`` with one bucket.

    Each epoch visits the samples in a permutation seeded by ``seed + epoch``; a bucket yields a batch when it
    has gathered ``batch_size`` samples, and partly filled buckets carry over into the next epoch (as the
    official sampler's), so every sample is trained even when its bucket is smaller than a batch.
    """
    if not buckets:
        raise ValueError("no samples to batch")
    pending: dict[Bucket, list[int]] = defaultdict(list)
    epoch = 0
    while True:
        order = torch.randperm(len(buckets), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in order:
            group = pending[buckets[i]]
            group.append(i)
            if len(group) == batch_size:
                yield epoch, group[:]
                group.clear()
        epoch += 1


def step_plan(buckets: list[Bucket], batch_size: int, seed: int, steps: int) -> tuple[list[list[int]], list[int]]:
    """The first ``steps`` batches of ``batch_plan`` and the epoch of each."""
    plan_iter = batch_plan(buckets, batch_size, seed)
    plan, epochs = [], []
    for _ in range(steps):
        epoch, batch = next(plan_iter)
        plan.append(batch)
        epochs.append(epoch)
    return plan, epochs


def describe_buckets(buckets: list[Bucket]) -> str:
    """One line per bucket: size, token count and how many samples it holds."""
    counts: dict[Bucket, int] = defaultdict(int)
    for b in buckets:
        counts[b] += 1
    return "\n".join(
        f"  {b.frames:3d} x {b.height} x {b.width}  ({b.tokens} tokens): {n} samples" for b, n in sorted(counts.items())
    )


# --------------------------------------------------------------------------------------------------
# Loading clips
# --------------------------------------------------------------------------------------------------


def clip_indices(total: int, frames: int, stride: int, generator: torch.Generator) -> list[int]:
    """``frames`` frame indices at ``stride`` from a random start (the stride shrinks for short videos)."""
    span = min(total, (frames - 1) * stride + 1)
    start = int(torch.randint(0, total - span + 1, (1,), generator=generator)) if total > span else 0
    if frames == 1:
        return [start]
    return [start + round(i * (span - 1) / (frames - 1)) for i in range(frames)]


def resize_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] -> [3, F, height, width] in [-1, 1]: resized to cover, then centre-cropped."""
    x = pixels.float().permute(0, 3, 1, 2)  # [F, 3, H, W]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return (x * 2 - 1).clamp(-1, 1).transpose(0, 1).contiguous()


def load_clip(sample: Sample, bucket: Bucket, stride: int, generator: torch.Generator) -> torch.Tensor:
    """The sample's training clip [3, F, H, W] in [-1, 1] at the bucket's size."""
    from ..video_io import read_image, read_video

    if sample.kind == "image":
        return resize_crop(read_image(sample.path)[None], bucket.height, bucket.width)
    indices = clip_indices(sample.frames, bucket.frames, stride, generator)
    video = read_video(sample.path, max_frames=indices[-1] + 1)
    if video.shape[0] <= indices[-1]:
        raise ValueError(f"{sample.path}: decoded {video.shape[0]} frames, expected {sample.frames} (#{sample.index})")
    return resize_crop(video[indices], bucket.height, bucket.width)
