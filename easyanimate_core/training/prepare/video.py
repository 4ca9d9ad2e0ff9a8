"""Reading and writing the videos of ``easyanimate prepare``: probes, frames by index, frame-exact clips.

    probe_video(path) -> VideoInfo            frames, fps and size from the container (no decoding)
    iter_frames(path, wanted=None)            (index, RGB frame [H, W, 3] uint8), decoded in order
    read_frames(path, indices) -> [frames]    the frames at ``indices`` (one pass, skipped frames not converted)
    uniform_indices(frames, count)            the official "uniform" sample: linspace(0, frames, count, no end)
    keyframe_indices(path) -> [int]           the I-frames (an encoder puts them at content changes)
    write_clip(path, frames, fps)             H.264 through imageio's ffmpeg, atomic, frame count verified

Frames are decoded with OpenCV, the backend PySceneDetect reads with here too, so the frame numbers of the detected
cuts and of the frames cut out are the same numbers. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...atomic import atomic_path

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".flv", ".ts")


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video."""

    frames: int
    fps: float
    width: int
    height: int

    @property
    def seconds(self) -> float:
        """Duration from the frame count and the frame rate."""
        return self.frames / self.fps if self.fps > 0 else 0.0


def _open(path: str | Path):
    """An opened cv2.VideoCapture; ValueError naming the file if OpenCV cannot read it."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise ValueError(f"cannot read video {path}")
    return capture


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of a video from its container (exact for mp4 files ffmpeg wrote)."""
    import cv2

    capture = _open(path)
    try:
        info = VideoInfo(
            frames=int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
            fps=float(capture.get(cv2.CAP_PROP_FPS)),
            width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
    finally:
        capture.release()
    if info.frames <= 0 or info.fps <= 0 or info.width <= 0 or info.height <= 0:
        raise ValueError(f"cannot read video {path}: the container reports {info}")
    return info


def iter_frames(path: str | Path, wanted: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame [H, W, 3] uint8) of every frame, or of the ``wanted`` indices only, in order."""
    import cv2

    wanted_set = None if wanted is None else set(wanted)
    last = None if wanted_set is None else max(wanted_set, default=-1)
    capture = _open(path)
    try:
        index = 0
        while last is None or index <= last:
            if wanted_set is not None and index not in wanted_set:
                # grab() decodes without the colour conversion and copy of read().
                if not capture.grab():
                    break
                index += 1
                continue
            ok, bgr = capture.read()
            if not ok:
                break
            yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()


def read_frames(path: str | Path, indices: Iterable[int]) -> list[np.ndarray]:
    """The RGB frames [H, W, 3] at ``indices`` (repeats allowed), in the order given; ValueError if one is missing."""
    indices = list(indices)
    found = dict(iter_frames(path, indices))
    missing = sorted(set(indices) - found.keys())
    if missing:
        raise ValueError(f"cannot read frame(s) {missing} of {path} (it has {len(found)} of those asked for)")
    return [found[i] for i in indices]


def uniform_indices(frames: int, count: int) -> list[int]:
    """``count`` frame indices spread over ``frames`` frames from the first one (the official "uniform" sampling)."""
    return sorted(set(np.linspace(0, frames, count, endpoint=False, dtype=int).tolist()))


_SHOWINFO = re.compile(r"\bn:\s*(\d+)\b.*?\btype:([A-Z?])")


def keyframe_indices(path: str | Path) -> list[int]:
    """Indices of the I-frames of a video (ffmpeg's showinfo over every decoded frame)."""
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-i", str(path)]
    command += ["-map", "0:v:0", "-vf", "showinfo", "-f", "null", "-"]
    report = subprocess.run(command, capture_output=True, text=True, errors="replace").stderr
    frames = _SHOWINFO.findall(report)
    if not frames:
        last = report.strip().splitlines()[-1] if report.strip() else "ffmpeg said nothing"
        raise ValueError(f"cannot read the frame types of {path} ({last})")
    return [int(n) for n, kind in frames if kind == "I"]


def write_clip(
    path: str | Path, frames: Iterable[np.ndarray], fps: float, crf: int = 22, preset: str = "veryfast"
) -> int:
    """Encode RGB frames [H, W, 3] uint8 as an H.264 mp4 at ``path`` (atomically); return the frame count.

    Official settings: libx264, preset veryfast, CRF 22. Sides are cropped to even numbers (yuv420p needs them,
    see ``even_size``). The file appears only once the container holds exactly the frames sent: a frame that
    ffmpeg dropped or duplicated (frame-rate rounding) is a ValueError, and nothing is left behind.
    """
    import imageio_ffmpeg

    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    width, height = even_size(first.shape[1], first.shape[0])
    sent = 0
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,  # never resize: the crop already made the sides even
            output_params=["-crf", str(crf), "-preset", preset],
        )
        writer.send(None)  # starts ffmpeg
        try:
            for frame in itertools.chain([first], frames):
                writer.send(np.ascontiguousarray(frame[:height, :width]))
                sent += 1
        finally:
            writer.close()
        written = probe_video(tmp).frames
        if written != sent:
            raise ValueError(f"{path}: sent {sent} frames to the encoder but the file holds {written}")
    return sent


def even_size(width: int, height: int) -> tuple[int, int]:
    """The size a clip is written at: each side rounded down to an even number (H.264 yuv420p)."""
    return width - width % 2, height - height % 2
