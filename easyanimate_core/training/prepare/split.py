"""Scene splitting: PySceneDetect's ContentDetector finds the cuts, the official length rules make clips of the
scenes, and each clip is cut frame-exactly (decoded and re-encoded) into its own mp4.

    SplitSettings                               the flags the clips depend on (a resume must use the same)
    detect_scenes(path, threshold, min_scene_frames) -> ([(start, end)], frames, fps)
    plan_clips(scenes, frames, fps, settings) -> ([ClipPlan], [(start, end, reason)])
    cut_clips(path, plans, folder, stem, fps, settings) -> [written frame counts]

Frame ranges are half-open, [start, end). The official rules (video_splitting.py): scenes under ``min_seconds`` are
dropped, scenes over ``max_seconds`` are cut into ``max_seconds`` pieces (a last piece under ``min_seconds``
dropped), and ``trim_seconds`` (0.5 s) comes off the end of a scene that ends at a detected cut, because the
detector sometimes reports a cut a few frames late. One difference: the trim is taken before the length rules, not
after, so that every clip kept is within [min_seconds, max_seconds].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .video import iter_frames, probe_video, write_clip


@dataclass(frozen=True)
class SplitSettings:
    """Everything a source's clips depend on; stored in the output folder and compared on resume."""

    threshold: float = 27.0  # ContentDetector threshold (official cutscene_detect.py)
    min_scene_frames: int = 15  # ContentDetector min_scene_len (official)
    min_seconds: float = 3.0  # official MIN_SECONDS
    max_seconds: float = 10.0  # official MAX_SECONDS
    trim_seconds: float = 0.5  # official: the last 0.5 s of a scene is dropped
    crf: int = 22  # official libx264 settings
    preset: str = "veryfast"

    def to_dict(self) -> dict:
        """The settings as JSON values."""
        return asdict(self)


@dataclass(frozen=True)
class ClipPlan:
    """One clip to cut: frames [start, end) of the source, named ``<stem>_<scene>`` or ``<stem>_<scene>_<piece>``."""

    scene: int
    piece: int | None  # None: the whole (trimmed) scene
    start: int
    end: int

    @property
    def suffix(self) -> str:
        """The part of the clip's file name after the source's stem."""
        return f"_{self.scene}" if self.piece is None else f"_{self.scene}_{self.piece}"

    @property
    def frames(self) -> int:
        """Number of frames in the clip."""
        return self.end - self.start


def detect_scenes(
    path: str | Path, threshold: float, min_scene_frames: int
) -> tuple[list[tuple[int, int]], int, float]:
    """([(start, end)] scenes covering the whole video, frame count, fps) by ContentDetector over every frame."""
    from scenedetect import ContentDetector, SceneManager, open_video

    video = open_video(str(path), backend="opencv")
    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_scene_frames))
    manager.detect_scenes(video, show_progress=False)
    # start_in_scene: a video without a cut is one scene (not an empty list).
    scenes = [(_frame(start), _frame(end)) for start, end in manager.get_scene_list(start_in_scene=True)]
    frames = scenes[-1][1] if scenes else 0
    if frames <= 0:
        raise ValueError(f"cannot read video {path}: no frames decoded")
    return scenes, frames, float(video.frame_rate)


def _frame(timecode) -> int:
    """A PySceneDetect FrameTimecode as a frame number (``frame_num`` from 0.7 on, ``get_frames()`` before)."""
    number = getattr(timecode, "frame_num", None)
    return int(number if number is not None else timecode.get_frames())


def plan_clips(
    scenes: list[tuple[int, int]], frames: int, fps: float, settings: SplitSettings
) -> tuple[list[ClipPlan], list[tuple[int, int, str]]]:
    """The clips the official length rules make of ``scenes``, and the spans they drop with the reason."""
    # Frame counts of the limits; the small tolerance keeps 3.0 s at 29.97 fps from rounding the wrong way.
    min_frames = max(1, math.ceil(settings.min_seconds * fps - 1e-6))
    max_frames = max(min_frames, math.floor(settings.max_seconds * fps + 1e-6))
    trim = round(settings.trim_seconds * fps)
    short = f"shorter than --min-seconds {settings.min_seconds:g}"
    plans, dropped = [], []
    for index, (start, end) in enumerate(scenes):
        if end < frames:  # ends at a detected cut: the frames before it may belong to the next scene
            end = max(start, end - trim)
        length = end - start
        if length < min_frames:
            dropped.append((start, end, short))
        elif length <= max_frames:
            plans.append(ClipPlan(index, None, start, end))
        else:
            for piece, piece_start in enumerate(range(start, end, max_frames)):
                piece_end = min(piece_start + max_frames, end)
                if piece_end - piece_start < min_frames:
                    dropped.append((piece_start, piece_end, short))
                else:
                    plans.append(ClipPlan(index, piece, piece_start, piece_end))
    return plans, dropped


def cut_clips(
    path: str | Path, plans: list[ClipPlan], clip_paths: list[Path], fps: float, settings: SplitSettings
) -> list[int]:
    """Write each plan's frames of the video at ``path`` to its clip path in one decoding pass; frame counts written.

    A clip file that already exists with the planned frame count is kept (an interrupted split of this source
    wrote it, atomically, with the same settings); ``plans`` must be sorted and not overlap.
    """
    counts = []
    frames = iter_frames(path, (i for plan in plans for i in range(plan.start, plan.end)))
    for plan, clip_path in zip(plans, clip_paths, strict=True):
        if clip_path.exists() and _frame_count(clip_path) == plan.frames:
            counts.append(plan.frames)
            continue
        clip_frames = _take(frames, plan)
        written = write_clip(clip_path, clip_frames, fps, crf=settings.crf, preset=settings.preset)
        if written != plan.frames:
            raise ValueError(f"{path}: frames {plan.start}-{plan.end} planned, {written} decoded")
        counts.append(written)
    return counts


def _frame_count(path: Path) -> int:
    """Frames in an existing clip, or -1 if it cannot be read."""
    try:
        return probe_video(path).frames
    except ValueError:
        return -1


def _take(frames, plan: ClipPlan):
    """The frames [plan.start, plan.end) from the shared (index, frame) iterator, skipping those before."""
    for index, frame in frames:
        if index < plan.start:
            continue
        yield frame
        if index + 1 >= plan.end:
            return
