"""Scoring micro-model videos with plain image analysis (numpy + OpenCV), against what the caption asked for.

    analyse(video) -> Analysis          background, per-frame objects and centroids, object colour, motion
    score(video, attributes) -> dict    colour / direction / speed / shape correct, share of one-object frames
    summarise(scores) -> dict           rates over many videos

A pixel is foreground when its RGB distance from the background colour (the median colour of the whole
video: the shape covers a few percent of it) exceeds FOREGROUND_DISTANCE. Objects are the 8-connected
foreground components of at least MIN_OBJECT_AREA pixels (smaller specks are noise, not objects; the
smallest shape the generator draws covers about 60 pixels), found on a torus: the micro world wraps around,
so a shape split by the frame's edge is one object. The object colour is the median of the
objects' interior pixels (eroded by one pixel, so anti-aliased edges do not pull it towards the
background), named by the palette colour whose mixes with the background come nearest to it: a decoder
that averages 8 x 8 blocks shows a small shape partly blended with the background (cyan half over black
is nearer to green than to cyan, but it lies on the black-cyan line), and naming the plain nearest
colour would score that blur, not the colour the model drew. Motion is a least-squares line through the
centroids of the largest object per frame, followed the short way round the wrapping frame: the dominant axis
and sign give the direction; less than MIN_TRAVEL pixels over the clip is "static".
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .data import ALL_COLOURS, SPEEDS, Attributes

FOREGROUND_DISTANCE = 60.0  # RGB distance (0-255 scale) from the background
MIN_OBJECT_AREA = 12  # pixels
MIN_TRAVEL = 4.0  # pixels over the whole clip below which the object counts as static
# Fill ratio (area / bounding-box area): square ~1.0, circle ~0.79, triangle ~0.5.
SHAPE_EXTENT = (("triangle", 0.65), ("circle", 0.9), ("square", float("inf")))
SPEED_THRESHOLD = sum(SPEEDS.values()) / len(SPEEDS)  # pixels per frame between "slowly" and "quickly"


@dataclass
class Analysis:
    """What the image analysis found in one video."""

    background: np.ndarray  # RGB float [3]
    counts: list[int]  # objects per frame
    centroids: np.ndarray  # [F, 2] (x, y) of the largest object, NaN where none
    extents: list[float]  # fill ratio of the largest object per frame (NaN where none)
    colour: str | None  # palette colour of the object pixels, blends allowed (None: no object anywhere)
    colour_rgb: np.ndarray | None
    velocity: np.ndarray  # [2] pixels per frame (x, y); NaN if fewer than two frames have an object
    direction: str  # "left" | "right" | "up" | "down" | "static" | "none"
    shape: str | None  # shape named by the median fill ratio

    @property
    def one_object_share(self) -> float:
        """Share of frames with exactly one object."""
        return float(np.mean([c == 1 for c in self.counts]))

    @property
    def speed(self) -> float:
        """Pixels per frame along the line fitted to the centroids."""
        return float(np.hypot(*self.velocity))


def as_uint8(video) -> np.ndarray:
    """[F, H, W, 3] uint8 from uint8 or float-in-[0, 1] frames (numpy or torch)."""
    array = video.detach().cpu().numpy() if hasattr(video, "detach") else np.asarray(video)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got shape {array.shape}")
    return array


def foreground(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Boolean [F, H, W]: pixels farther than FOREGROUND_DISTANCE from the background colour."""
    return np.linalg.norm(frames.astype(np.float32) - background, axis=-1) > FOREGROUND_DISTANCE


def mixed_colour(
    rgb: np.ndarray, background: np.ndarray, palette: dict[str, tuple[int, int, int]] = ALL_COLOURS
) -> str:
    """The palette name whose blends with ``background`` (the segment from it to the colour) pass closest to ``rgb``."""
    offset = np.asarray(rgb, np.float32) - background

    def distance(name: str) -> float:
        direction = np.asarray(palette[name], np.float32) - background
        share = np.clip(offset @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
        return float(np.linalg.norm(offset - share * direction))

    return min(palette, key=distance)


def _torus_labels(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels [H, W] of ``mask`` on a torus (the micro world wraps around): components
    touching across opposite edges share a label; 0 is background."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for first, last in ((labels[:, 0], labels[:, -1]), (labels[0], labels[-1])):
        for shift in (-1, 0, 1):  # 8-connectivity: the diagonal neighbours across the edge too
            across = np.roll(last, shift)
            for a, b in zip(first[(first > 0) & (across > 0)], across[(first > 0) & (across > 0)], strict=True):
                parent[root(int(a))] = root(int(b))
    roots = np.array([root(i) for i in range(n)])
    return roots[labels]


def _unwrapped(coordinates: np.ndarray, size: int) -> np.ndarray:
    """``coordinates`` of one object on a circle of ``size`` moved next to each other (around their circular mean)."""
    angles = coordinates * (2 * np.pi / size)
    centre = np.angle(np.exp(1j * angles).mean()) * size / (2 * np.pi)
    return centre + (coordinates - centre + size / 2) % size - size / 2


def _objects(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels [H, W], and per kept component (largest first): labels, areas, centroids [K, 2] and extents.

    Components are found on a torus, so a shape split by a frame edge counts once; its centroid and bounding box
    are measured with its pieces put together (the centroid then taken back inside the frame)."""
    labels = _torus_labels(mask)
    height, width = mask.shape
    found = []
    for label in np.unique(labels[labels > 0]):
        ys, xs = np.nonzero(labels == label)
        if len(xs) < MIN_OBJECT_AREA:
            continue
        xs, ys = _unwrapped(xs.astype(np.float64), width), _unwrapped(ys.astype(np.float64), height)
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        found.append((len(xs), label, (xs.mean() % width, ys.mean() % height), len(xs) / box))
    found.sort(key=lambda f: -f[0])
    keep = np.array([f[1] for f in found], dtype=np.int64)
    centroids = np.array([f[2] for f in found], dtype=np.float64).reshape(-1, 2)
    return labels, keep, centroids, np.array([f[3] for f in found])


def _track(centroids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centroids [N, 2] of consecutive sightings as one continuous path: each step is the shortest way round the
    wrapping frame (a shape moves far less than half a frame between sightings)."""
    steps = np.diff(centroids, axis=0)
    steps = (steps + np.array(size) / 2) % np.array(size) - np.array(size) / 2
    return centroids[0] + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])


def _direction(velocity: np.ndarray, frames: int) -> str:
    """The dominant axis and sign of ``velocity`` (x right, y down), or "static" below MIN_TRAVEL."""
    if np.isnan(velocity).any():
        return "none"
    if np.abs(velocity).max() * (frames - 1) < MIN_TRAVEL:
        return "static"
    vx, vy = velocity
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def analyse(video) -> Analysis:
    """Find the objects in every frame of ``video`` ([F, H, W, 3], uint8 or float in [0, 1])."""
    frames = as_uint8(video)
    background = np.median(frames.reshape(-1, 3), axis=0).astype(np.float32)
    masks = foreground(frames, background)
    counts, centroids, extents, interior = [], [], [], []
    kernel = np.ones((3, 3), np.uint8)
    for frame, mask in zip(frames, masks, strict=True):
        labels, keep, centres, fills = _objects(mask)
        counts.append(len(keep))
        centroids.append(centres[0] if len(keep) else (np.nan, np.nan))
        extents.append(float(fills[0]) if len(keep) else float("nan"))
        if len(keep):
            objects = np.isin(labels, keep).astype(np.uint8)
            core = cv2.erode(objects, kernel).astype(bool)
            interior.append(frame[core if core.any() else objects.astype(bool)])
    centroids = np.array(centroids, dtype=np.float64)
    colour_rgb = np.median(np.concatenate(interior), axis=0) if interior else None
    seen = ~np.isnan(centroids[:, 0])
    velocity = np.full(2, np.nan)
    if seen.sum() >= 2:
        t = np.arange(len(frames))[seen]
        path = _track(centroids[seen], (frames.shape[2], frames.shape[1]))
        velocity = np.array([np.polyfit(t, path[:, axis], 1)[0] for axis in (0, 1)])
    median_extent = np.nanmedian(extents) if seen.any() else float("nan")
    shape = next((name for name, limit in SHAPE_EXTENT if median_extent < limit), None) if seen.any() else None
    return Analysis(
        background=background,
        counts=counts,
        centroids=centroids,
        extents=extents,
        colour=mixed_colour(colour_rgb, background) if colour_rgb is not None else None,
        colour_rgb=colour_rgb,
        velocity=velocity,
        direction=_direction(velocity, len(frames)),
        shape=shape,
    )


def score(video, attributes: Attributes) -> dict:
    """Whether ``video`` shows what ``attributes`` ask for: one dict of booleans and measurements."""
    found = analyse(video)
    speed = "quickly" if found.speed > SPEED_THRESHOLD else "slowly"
    return {
        "caption": attributes.caption,
        "colour_ok": found.colour == attributes.colour,
        "direction_ok": found.direction == attributes.direction,
        "speed_ok": found.direction == attributes.direction and speed == attributes.speed,
        "shape_ok": found.shape == attributes.shape,
        "one_object_share": found.one_object_share,
        "colour": found.colour,
        "direction": found.direction,
        "speed": round(found.speed, 3),
        "shape": found.shape,
    }


def summarise(scores: list[dict]) -> dict:
    """Rates over many scored videos: share correct per attribute and share of frames with one object."""
    if not scores:
        raise ValueError("no scores to summarise")
    rates = {
        key: float(np.mean([s[key] for s in scores])) for key in ("colour_ok", "direction_ok", "speed_ok", "shape_ok")
    }
    rates["one_object_frames"] = float(np.mean([s["one_object_share"] for s in scores]))
    if all("direction_kept" in s for s in scores):  # long clips: the direction in each half on its own
        rates["direction_kept"] = float(np.mean([s["direction_kept"] for s in scores]))
    rates["samples"] = len(scores)
    return rates
