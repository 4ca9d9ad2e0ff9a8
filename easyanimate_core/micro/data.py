"""Procedural training data for the micro model: one shape moving across a plain background.

    Attributes(shape, colour, direction, speed, background).caption
        "a red circle moving right slowly on a navy background"
    training_attributes() / held_out_attributes()   every caption combination, split by HELD_OUT_PAIRS
    sample_clip(attributes, rng) -> Clip             random size and start position (wrapping world, or one that
                                                     keeps the shape in frame)
    render(clip) -> uint8 [F, H, W, 3]              anti-aliased frames (drawn 4x larger, area-downsampled)
    write_dataset(root, attributes, per_combination, seed) -> metadata.json path
        the official dataset JSON (a list of {file_path, text, type}) + one mp4 per clip

The frame wraps around (``Clip.wrap``): a shape leaving one edge comes back at the opposite one, so a
shape keeps its direction and stays one object for any number of frames. A 64-pixel frame holds 47 pixels
of travel, which "quickly" uses up in 21 frames: in a bounded world a clip longer than that cannot show one
shape moving one way (it must leave the frame, turn or jump), and long-clip generation could not be judged.
The first training stages of the shipped weights used the bounded world (``wrap=False``: start positions that
keep the whole shape inside for all frames); see the model card.

Held out of training: every clip whose (colour, shape) pair is in HELD_OUT_PAIRS. Each colour, shape,
direction, speed and background on its own is still seen in training, so a held-out prompt asks the
model to compose known words in a combination it never saw. ``EXTRA_COLOURS`` are never in the base
training set: they are new concepts for a LoRA to teach.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

SIZE = 64  # pixels (height = width)
FRAMES = 17  # 4k+1: five latent frames in the mag VAE
SUPERSAMPLE = 4  # shapes are drawn this much larger, then area-downsampled (anti-aliasing, sub-pixel motion)

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 255),
    "yellow": (240, 220, 40),
    "white": (240, 240, 240),
}
# Colours the base model never sees in training (a LoRA's new concept); the scorers still know them.
EXTRA_COLOURS = {"cyan": (30, 220, 230)}
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}
# Background names share no word with object colours ("navy", not "dark blue"): the DiT sees text tokens
# without positions, so a word must mean one thing wherever it stands in the caption.
BACKGROUNDS = {
    "black": (0, 0, 0),
    "gray": (100, 100, 100),
    "navy": (20, 30, 90),
    "brown": (90, 55, 25),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slowly": 1.0, "quickly": 2.25}  # pixels per frame
HELD_OUT_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
RADIUS_RANGE = (6.0, 8.0)  # half-size of a shape in pixels
MARGIN = 1.0  # pixels kept between a shape and the frame edge


@dataclass(frozen=True)
class Attributes:
    """What a caption says: the shape, its colour, where and how fast it moves, and the background."""

    shape: str
    colour: str
    direction: str
    speed: str
    background: str

    def __post_init__(self):
        for name, value, valid in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, ALL_COLOURS),
            ("direction", self.direction, DIRECTIONS),
            ("speed", self.speed, SPEEDS),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")

    @property
    def caption(self) -> str:
        """The training caption."""
        return f"a {self.colour} {self.shape} moving {self.direction} {self.speed} on a {self.background} background"

    @property
    def held_out(self) -> bool:
        """Whether this combination is kept out of the base training set."""
        return (self.colour, self.shape) in HELD_OUT_PAIRS


@dataclass(frozen=True)
class Clip:
    """One video: attributes plus geometry (half-size and the centre at frame 0, in pixels)."""

    attributes: Attributes
    radius: float
    x0: float
    y0: float
    frames: int = FRAMES
    size: int = SIZE
    wrap: bool = True  # the frame wraps around (positions modulo the size)

    def centre(self, t: int) -> tuple[float, float]:
        """The shape's centre (x, y) at frame ``t`` (inside the frame when it wraps)."""
        dx, dy = DIRECTIONS[self.attributes.direction]
        step = SPEEDS[self.attributes.speed]
        x, y = self.x0 + dx * step * t, self.y0 + dy * step * t
        return (x % self.size, y % self.size) if self.wrap else (x, y)

    def to_json(self) -> dict:
        """Attributes and geometry as a flat JSON object (``clip_from_json`` reads it back)."""
        return {
            **asdict(self.attributes),
            "radius": self.radius,
            "x0": self.x0,
            "y0": self.y0,
            "frames": self.frames,
            "size": self.size,
            "wrap": self.wrap,
        }


def all_attributes(colours=COLOURS) -> list[Attributes]:
    """Every combination of shape, colour, direction, speed and background (``colours``: names to use)."""
    return [
        Attributes(shape, colour, direction, speed, background)
        for colour, shape, direction, speed, background in itertools.product(
            colours, SHAPES, DIRECTIONS, SPEEDS, BACKGROUNDS
        )
    ]


def training_attributes() -> list[Attributes]:
    """The base training combinations: every base colour, without the held-out (colour, shape) pairs."""
    return [a for a in all_attributes() if not a.held_out]


def held_out_attributes() -> list[Attributes]:
    """The combinations kept out of training (evaluation prompts)."""
    return [a for a in all_attributes() if a.held_out]


def sample_clip(
    attributes: Attributes, rng: np.random.Generator, frames: int = FRAMES, size: int = SIZE, wrap: bool = True
) -> Clip:
    """A random half-size and start: anywhere along the motion when the frame wraps, else one that keeps the whole
    shape inside the frame for all ``frames``; across the motion the shape is always wholly inside."""
    radius = float(rng.uniform(*RADIUS_RANGE))
    travel = SPEEDS[attributes.speed] * (frames - 1)
    low, high = radius * 1.25 + MARGIN, size - radius * 1.25 - MARGIN  # 1.25: the triangle's circumradius
    if not wrap and high - low < travel:
        raise ValueError(f"a {size}-pixel frame is too small for {frames} frames moving {attributes.speed}")
    dx, dy = DIRECTIONS[attributes.direction]
    start = []
    for d in (dx, dy):
        if d and wrap:
            start.append(float(rng.uniform(0, size)))
        elif d > 0:
            start.append(float(rng.uniform(low, high - travel)))
        elif d < 0:
            start.append(float(rng.uniform(low + travel, high)))
        else:
            start.append(float(rng.uniform(low, high)))
    return Clip(attributes, radius, start[0], start[1], frames, size, wrap)


def shape_polygon(shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """Vertices [N, 2] (x, y) of a circle (64-gon), an axis-aligned square or an upward triangle."""
    if shape == "circle":
        angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    if shape == "square":
        h = radius * 0.9
        return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    # Equilateral, centroid at the centre, pointing up.
    angles = np.deg2rad([-90.0, 30.0, 150.0])
    return np.stack([cx + 1.25 * radius * np.cos(angles), cy + 1.25 * radius * np.sin(angles)], axis=1)


def render_frame(
    clip: Clip, t: int, colours: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
) -> np.ndarray:
    """Frame ``t`` of ``clip`` as uint8 [H, W, 3] RGB; ``colours`` (object, background) replace the named ones."""
    shape_rgb, background_rgb = colours or (
        ALL_COLOURS[clip.attributes.colour],
        BACKGROUNDS[clip.attributes.background],
    )
    big = clip.size * SUPERSAMPLE
    canvas = np.empty((big, big, 3), np.uint8)
    canvas[:] = background_rgb
    cx, cy = clip.centre(t)
    # A wrapping frame shows the shape once more one frame-width away on each side (fillPoly clips what is outside).
    offsets = (-clip.size, 0, clip.size) if clip.wrap else (0,)
    for ox in offsets:
        for oy in offsets:
            # Pixel i covers [i, i+1): the supersampled polygon is scaled about the origin.
            points = shape_polygon(clip.attributes.shape, cx + ox, cy + oy, clip.radius) * SUPERSAMPLE
            cv2.fillPoly(canvas, [np.round(points * 16).astype(np.int32)], tuple(map(int, shape_rgb)), cv2.LINE_8, 4)
    return cv2.resize(canvas, (clip.size, clip.size), interpolation=cv2.INTER_AREA)


def render(clip: Clip, colours: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None) -> np.ndarray:
    """All frames of ``clip``: uint8 [F, H, W, 3] RGB (``colours`` as in ``render_frame``)."""
    return np.stack([render_frame(clip, t, colours) for t in range(clip.frames)])


def sample_clips(attributes: list[Attributes], per_combination: int, seed: int, wrap: bool = True) -> list[Clip]:
    """``per_combination`` random clips of each combination, in order, from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [sample_clip(a, rng, wrap=wrap) for a in attributes for _ in range(per_combination)]


def write_dataset(
    root: str | Path,
    attributes: list[Attributes],
    per_combination: int = 1,
    seed: int = 0,
    name: str = "metadata.json",
    fps: float = 8.0,
    progress=None,
    video_format: str = "mp4",
    wrap: bool = True,
) -> Path:
    """Render clips of ``attributes`` to ``root/videos/`` and write ``root/name``; return its path.

    ``video_format`` "mp4" writes H.264 files; "png" writes a folder of lossless PNG frames per clip (the
    training recipe's choice: exact pixels, and no ffmpeg needed on the training machine). Entries are the
    official {file_path, text, type} plus "clip" (attributes and geometry, for scoring); the same seed writes
    the same clips; ``wrap``: the world the clips move in (``Clip.wrap``). The metadata file is written last,
    atomically, so it only exists once every video does.
    """
    import torch

    from ..atomic import atomic_path
    from ..video_io import write_video

    if video_format not in ("mp4", "png"):
        raise ValueError(f"video_format must be 'mp4' or 'png', got {video_format!r}")
    root = Path(root)
    clips = sample_clips(attributes, per_combination, seed, wrap)
    entries = []
    for i, clip in enumerate(clips):
        file_path = f"videos/{i:05d}" + (".mp4" if video_format == "mp4" else "")
        frames = torch.from_numpy(render(clip)).float() / 255
        write_video(root / file_path, frames, fps=fps, metadata={"caption": clip.attributes.caption})
        entries.append(
            {"file_path": file_path, "text": clip.attributes.caption, "type": "video", "clip": clip.to_json()}
        )
        if progress:
            progress(i + 1, len(clips))
    target = root / name
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return target


def clip_from_json(d: dict) -> Clip:
    """The Clip a dataset entry's "clip" field describes."""
    names = ("shape", "colour", "direction", "speed", "background")
    # Datasets written before the world wrapped have no "wrap": theirs was bounded.
    geometry = (d["radius"], d["x0"], d["y0"], d.get("frames", FRAMES), d.get("size", SIZE), d.get("wrap", False))
    return Clip(Attributes(*(d[n] for n in names)), *geometry)
