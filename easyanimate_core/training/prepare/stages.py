"""The stages of ``easyanimate prepare``, each a named unit of work with a recorded result and a verdict.

    SplitStage        per source: probe, resolution / aspect check, scenes, clips cut       (records keyed by source)
    DurationStage     per clip: length in seconds
    TextStage         per clip: share of the middle frame covered by text (OCR)
    MotionStage       per clip: mean optical-flow magnitude
    ConsistencyStage  per clip, model: similarity of neighbouring key frames (missed scene cuts)
    AestheticStage    per clip, model: mean aesthetic score of 4 frames
    CaptionStage      per clip, model: a caption from a video-language model

Every stage has a ``name``, ``settings()`` ({flag: value} its results depend on: a resume with other values is
refused), and either ``score(item) -> dict`` (CPU stages: run in worker processes or Ray tasks, one item each) or,
with ``model = True``, ``load() -> scorer`` with ``scorer(items) -> [dict]`` (one model in one process, batches
of ``batch_size``: the main process locally, a Ray actor on Ray). ``verdict(record)`` says why an item is dropped
under this run's thresholds (the reason names the flag), or None. ``run_item`` / ``run_batch`` turn an exception
into an ``{"error": ...}`` result, so one unreadable video does not stop a run (errors are retried on resume).

Items are plain dicts (they travel to workers and through Ray as JSON): a source is {"source", "path"}; a clip is
{"clip", "path", "source", "frames", "fps", "width", "height"}, where "clip" is its path relative to the output
folder (the dataset's file_path).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .filters import motion_score, resolution_problem, text_area
from .split import SplitSettings, cut_clips, detect_scenes, plan_clips
from .video import even_size, keyframe_indices, probe_video, read_frames, uniform_indices


def run_item(stage, item: dict) -> dict:
    """``stage.score(item)``, or {"error": "..."} if it raised."""
    try:
        return stage.score(item)
    except Exception as e:  # any failure of one item is recorded, not fatal
        return {"error": _error_text(e)}


def run_batch(scorer, items: list[dict]) -> list[dict]:
    """``scorer(items)``; if the batch fails, each item alone, so only the failing ones get {"error": ...}."""
    try:
        return scorer(items)
    except Exception:
        results = []
        for item in items:
            try:
                results.append(scorer([item])[0])
            except Exception as e:
                results.append({"error": _error_text(e)})
        return results


def _error_text(e: Exception) -> str:
    """One line naming the exception and where it was raised."""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    place = f" ({Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {e}{place}"


# --------------------------------------------------------------------------------------------------
# Sources -> clips
# --------------------------------------------------------------------------------------------------


@dataclass
class SplitStage:
    """Cut each source into clips (or, with ``split`` False, take it whole), after the resolution check."""

    out_root: str
    split_settings: SplitSettings = field(default_factory=SplitSettings)
    split: bool = True
    min_pixels: int = 512 * 512
    min_aspect: float | None = None
    max_aspect: float | None = None
    name: str = "split"
    model: bool = False

    def settings(self) -> dict:
        """The flags the clips depend on."""
        s = self.split_settings
        if not self.split:
            return {"--no-split": True}
        return {
            "--no-split": False,
            "--scene-threshold": s.threshold,
            "--min-scene-frames": s.min_scene_frames,
            "--min-seconds": s.min_seconds,
            "--max-seconds": s.max_seconds,
            "--trim-seconds": s.trim_seconds,
            "--crf": s.crf,
            "--preset": s.preset,
        }

    def resolution_verdict(self, record: dict) -> str | None:
        """Why a split record's source is dropped for its size under this run's flags, or None."""
        return resolution_problem(record["width"], record["height"], self.min_pixels, self.min_aspect, self.max_aspect)

    def needs_run(self, record: dict | None) -> bool:
        """Whether a source must be (re)split: no record, an error, or skipped for a size this run accepts."""
        if record is None or "error" in record:
            return True
        return "skipped" in record and self.resolution_verdict(record) is None

    def score(self, item: dict) -> dict:
        """Probe the source; unless its size is refused, detect scenes and write its clips."""
        path = Path(item["path"])
        info = probe_video(path)
        record = {"width": info.width, "height": info.height, "fps": info.fps, "frames": info.frames}
        problem = self.resolution_verdict(record)
        if problem:
            return {**record, "skipped": problem}
        if not self.split:
            clip = os.path.relpath(path, self.out_root)
            return {**record, "clips": [{"clip": clip, "start": 0, "end": info.frames, "frames": info.frames}]}
        s = self.split_settings
        scenes, frames, fps = detect_scenes(path, s.threshold, s.min_scene_frames)
        plans, dropped = plan_clips(scenes, frames, fps, s)
        stem = Path(item["source"]).with_suffix("").as_posix()
        names = [f"clips/{stem}{plan.suffix}.mp4" for plan in plans]
        counts = cut_clips(path, plans, [Path(self.out_root) / name for name in names], fps, s)
        clips = [
            {"clip": name, "start": plan.start, "end": plan.end, "frames": count}
            for name, plan, count in zip(names, plans, counts, strict=True)
        ]
        return {**record, "fps": fps, "frames": frames, "scenes": scenes, "clips": clips, "dropped": dropped}

    def clip_items(self, source: str, record: dict) -> list[dict]:
        """The clip items of a finished split record."""
        width, height = (record["width"], record["height"])
        if self.split:
            width, height = even_size(width, height)
        return [
            {
                "clip": clip["clip"],
                "path": os.path.normpath(os.path.join(self.out_root, clip["clip"])),
                "source": source,
                "frames": clip["frames"],
                "fps": record["fps"],
                "width": width,
                "height": height,
            }
            for clip in record.get("clips", [])
        ]


# --------------------------------------------------------------------------------------------------
# CPU filters
# --------------------------------------------------------------------------------------------------


@dataclass
class DurationStage:
    """Clip length in seconds against --min-seconds / --max-seconds (split clips pass by construction)."""

    min_seconds: float = 3.0
    max_seconds: float = 10.0
    name: str = "duration"
    model: bool = False

    def settings(self) -> dict:
        return {}

    def score(self, item: dict) -> dict:
        return {"seconds": round(item["frames"] / item["fps"], 4)}

    def verdict(self, record: dict) -> str | None:
        if record["seconds"] < self.min_seconds - 1e-3:
            return f"shorter than --min-seconds {self.min_seconds:g}"
        if record["seconds"] > self.max_seconds + 1e-3:
            return f"longer than --max-seconds {self.max_seconds:g}"
        return None


@dataclass
class TextStage:
    """Share of the frame covered by text boxes (OCR); more than --max-text-area is dropped (official 0.02)."""

    max_area: float = 0.02
    frames: int = 1
    threads: int = 0  # onnxruntime threads per process; 0: its default (all cores)
    name: str = "text"
    model: bool = False

    def settings(self) -> dict:
        return {"--text-frames": self.frames}

    def score(self, item: dict) -> dict:
        return {"text_area": round(text_area(item["path"], item["frames"], self.frames, self.threads), 5)}

    def verdict(self, record: dict) -> str | None:
        if record["text_area"] > self.max_area:
            return f"text area above --max-text-area {self.max_area:g}"
        return None


@dataclass
class MotionStage:
    """Mean optical-flow magnitude; under --min-motion (static) or above --max-motion (too fast) is dropped."""

    min_motion: float = 2.0
    max_motion: float = 20.0
    sample_fps: float = 2.0
    name: str = "motion"
    model: bool = False

    def settings(self) -> dict:
        return {"--motion-fps": self.sample_fps}

    def score(self, item: dict) -> dict:
        return {"motion": round(motion_score(item["path"], item["fps"], item["frames"], self.sample_fps), 5)}

    def verdict(self, record: dict) -> str | None:
        if record["motion"] < self.min_motion:
            return f"motion under --min-motion {self.min_motion:g}"
        if record["motion"] > self.max_motion:
            return f"motion above --max-motion {self.max_motion:g}"
        return None


# --------------------------------------------------------------------------------------------------
# Model stages
# --------------------------------------------------------------------------------------------------


@dataclass
class ConsistencyStage:
    """Minimum cosine similarity of neighbouring sampled frames (image model embeddings); under
    --min-consistency (official 0.8) the clip holds a scene change and is dropped."""

    model_folder: str
    device: str = "cpu"
    min_similarity: float = 0.8
    batch_size: int = 16
    name: str = "consistency"
    model: bool = True

    def settings(self) -> dict:
        return {"--consistency-model": self.model_folder}

    def load(self):
        """A scorer of clip batches holding the loaded image model."""
        from .image_models import ImageEmbedder, adjacent_similarity, consistency_indices

        embedder = ImageEmbedder(self.model_folder, self.device)

        def scorer(items: list[dict]) -> list[dict]:
            indices = [consistency_indices(i["frames"], i["fps"], keyframe_indices(i["path"])) for i in items]
            frames = [f for item, idx in zip(items, indices, strict=True) for f in read_frames(item["path"], idx)]
            embeddings = embedder.embed(frames).split([len(idx) for idx in indices])  # per clip [n, D]
            results = []
            for idx, emb in zip(indices, embeddings, strict=True):
                similarity = [round(s, 5) for s in adjacent_similarity(emb)]
                results.append(
                    {"frames": idx, "similarity": similarity, "min_similarity": min(similarity, default=1.0)}
                )
            return results

        return scorer

    def verdict(self, record: dict) -> str | None:
        if record["min_similarity"] < self.min_similarity:
            return f"similarity under --min-consistency {self.min_similarity:g}"
        return None


@dataclass
class AestheticStage:
    """Mean aesthetic score of uniformly sampled frames (image model + linear head); under --min-aesthetic
    (official 4.0) is dropped."""

    model_folder: str
    head_file: str
    device: str = "cpu"
    min_score: float = 4.0
    frames: int = 4
    batch_size: int = 16
    name: str = "aesthetic"
    model: bool = True

    def settings(self) -> dict:
        return {
            "--aesthetic-model": self.model_folder,
            "--aesthetic-head": self.head_file,
            "--aesthetic-frames": self.frames,
        }

    def load(self):
        """A scorer of clip batches holding the loaded image model and head."""
        import torch

        from .image_models import AestheticHead, ImageEmbedder

        embedder = ImageEmbedder(self.model_folder, self.device)
        head = AestheticHead.load(self.head_file)

        def scorer(items: list[dict]) -> list[dict]:
            indices = [uniform_indices(item["frames"], self.frames) for item in items]
            frames = [f for item, idx in zip(items, indices, strict=True) for f in read_frames(item["path"], idx)]
            with torch.no_grad():
                scores = head(embedder.embed(frames)).split([len(idx) for idx in indices])  # per clip [n]
            return [
                {"frame_scores": [round(v, 5) for v in s.tolist()], "aesthetic": round(float(s.mean()), 5)}
                for s in scores
            ]

        return scorer

    def verdict(self, record: dict) -> str | None:
        if record["aesthetic"] < self.min_score:
            return f"aesthetic score under --min-aesthetic {self.min_score:g}"
        return None


@dataclass
class CaptionStage:
    """A caption from a local video-language model, for clips without a written caption."""

    model_folder: str
    device: str = "cpu"
    prompt: str = "Describe this video in detail. Don't repeat."
    frames: int = 8
    max_new_tokens: int = 512
    batch_size: int = 1
    name: str = "caption"
    model: bool = True

    def settings(self) -> dict:
        return {
            "--caption-model": self.model_folder,
            "--caption-prompt": self.prompt,
            "--caption-frames": self.frames,
            "--caption-max-tokens": self.max_new_tokens,
        }

    def load(self):
        """A scorer of clips holding the loaded captioning model (one clip per generate call)."""
        from .captions import VideoCaptioner

        captioner = VideoCaptioner(self.model_folder, self.device, self.prompt, self.max_new_tokens)

        def scorer(items: list[dict]) -> list[dict]:
            results = []
            for item in items:
                frames = read_frames(item["path"], uniform_indices(item["frames"], self.frames))
                results.append({"caption": captioner.caption(frames)})
            return results

        return scorer

    def verdict(self, record: dict) -> str | None:
        return None if record["caption"].strip() else "the model's caption is empty"
