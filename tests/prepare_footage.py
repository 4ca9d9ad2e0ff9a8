"""Synthetic footage with known cuts for the ``easyanimate prepare`` tests and bench: tiny (64x48, 8 fps) H.264
videos made of scenes of clearly different colour and texture joined by hard cuts at known frames.

    Scene(kind, frames, tint, seed, text=None)   "moving" (1.5 px a frame), "fast" (4 px a frame) or "static"
    render(scenes, width, height) -> [F, H, W, 3] uint8, cut frame indices
    write_footage(path, scenes, fps) -> cut frame indices

A scene is a smooth random texture (a sum of sinusoids, no edges OCR could read as text) tinted one colour and
panned sideways; ``text`` burns large white letters into every frame (cv2.putText).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FPS = 8
WIDTH, HEIGHT = 64, 48
SPEED = {"static": 0.0, "moving": 1.5, "fast": 3.5}  # pixels a frame


@dataclass(frozen=True)
class Scene:
    """One shot of the footage."""

    kind: str
    frames: int
    tint: tuple[int, int, int]
    seed: int
    text: str | None = None


def _texture(seed: int, width: int, height: int) -> np.ndarray:
    """A smooth grey texture [height, width] in [0.25, 1] (dark enough nowhere to look like text)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = np.zeros((height, width), np.float32)
    for _ in range(6):
        fx, fy, phase = rng.uniform(0.08, 0.3), rng.uniform(0.08, 0.3), rng.uniform(0, 2 * np.pi)
        texture += np.sin(xx * fx + yy * fy + phase)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    return 0.25 + 0.75 * texture


def render_scene(scene: Scene, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """The scene's frames [F, H, W, 3] uint8."""
    import cv2

    speed = SPEED[scene.kind]
    pan = int(np.ceil(speed * scene.frames)) + 1
    texture = _texture(scene.seed, width + pan, height)[..., None] * np.array(scene.tint, np.float32)  # [H, W+pan, 3]
    frames = np.empty((scene.frames, height, width, 3), np.uint8)
    for i in range(scene.frames):
        offset = int(round(speed * i))
        frames[i] = texture[:, offset : offset + width].astype(np.uint8)
        if scene.text:
            cv2.putText(frames[i], scene.text, (1, height - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2)
    return frames


def render(scenes: list[Scene], width: int = WIDTH, height: int = HEIGHT) -> tuple[np.ndarray, list[int]]:
    """All scenes one after the other [F, H, W, 3], and the frame index where each scene after the first starts."""
    parts = [render_scene(scene, width, height) for scene in scenes]
    cuts = list(np.cumsum([len(p) for p in parts])[:-1].tolist())
    return np.concatenate(parts), cuts


def write_footage(
    path: Path, scenes: list[Scene], fps: float = FPS, width: int = WIDTH, height: int = HEIGHT
) -> list[int]:
    """Write the scenes as an H.264 mp4 (near-lossless, CRF 12); return the cut frame indices."""
    import imageio_ffmpeg

    frames, cuts = render(scenes, width, height)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec="libx264", macro_block_size=1, output_params=["-crf", "12"]
    )
    writer.send(None)
    for frame in frames:
        writer.send(frame)
    writer.close()
    return cuts
