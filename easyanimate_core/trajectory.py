"""Trajectory control for V5.1 Control models: points per frame -> the control video the model reads.

    video = trajectory_video([[(x, y), ...], ...], height=384, width=672)    [F, H, W, 3] float in [0, 1]
    tracks = parse_tracks('[{"x": 10, "y": 20}, ...]' or a list of such)   the official coordinates format

As EasyAnimate's trajectory node (after KJNodes' spline editor) draws it, checked against its output
(tests/test_camera.py, bench/control_reference.py): every frame is black but for a Gaussian spot (sigma 40 on a
200-pixel disc, peak 1) centred on each track's point, resized bilinearly to a square of half-side
50 * sqrt(H W / (1280 720)) pixels clipped at the frame, where spots meet the brighter wins. The video then
goes to the model like any control video (VAE-encoded).
"""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import torch

SPOT_PIXELS = 200  # the Gaussian spot is drawn once at this size, then resized per frame size
SPOT_SIGMA = 40.0
BASE_HALF_SIDE = 50  # the spot's half-side in a 1280 x 720 frame


def gaussian_spot(size: int = SPOT_PIXELS, sigma: float = SPOT_SIGMA) -> np.ndarray:
    """The spot [size, size] uint8: a Gaussian cut to a disc, scaled so its peak is 255."""
    disc = cv2.circle(np.zeros((size, size), np.float32), (size // 2, size // 2), size // 2 - 1, 1, -1)
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    gauss = 1 / (2 * np.pi * sigma**2) * np.exp(-0.5 * ((i - size / 2) ** 2 + (j - size / 2) ** 2) / sigma**2)
    spot = gauss.astype(np.float32) * disc
    return (spot / spot.max() * 255).astype(np.uint8)


def parse_tracks(coordinates) -> list[list[tuple[int, int]]]:
    """Tracks from the official coordinates: a JSON list of {"x": .., "y": ..} per frame, or a list of them; as
    text or already parsed."""
    if isinstance(coordinates, list) and coordinates and isinstance(coordinates[0], dict):
        coordinates = [coordinates]  # one parsed track
    texts = [coordinates] if isinstance(coordinates, str) else list(coordinates)
    tracks = []
    for text in texts:
        try:
            points = json.loads(text.replace("'", '"')) if isinstance(text, str) else text
            tracks.append([(int(p["x"]), int(p["y"])) for p in points])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f'trajectory coordinates must be a JSON list of {{"x": .., "y": ..}} per frame ({e})'
            ) from e
    if not tracks or any(len(t) != len(tracks[0]) or not t for t in tracks):
        raise ValueError("every trajectory needs the same number of points (one per frame), at least one")
    return tracks


def trajectory_video(tracks: list[list[tuple[int, int]]], height: int, width: int) -> torch.Tensor:
    """The control video [frames, height, width, 3] (float64 in [0, 1], as the official node) of ``tracks``."""
    spot = gaussian_spot()
    half = int(BASE_HALF_SIDE * math.sqrt(height * width / (1280 * 720)))
    video = np.zeros((len(tracks[0]), height, width, 3))
    for track in tracks:
        for f, (x, y) in enumerate(track):
            y1, y2 = max(y - half, 0), min(y + half, height - 1)
            x1, x2 = max(x - half, 0), min(x + half, width - 1)
            if x2 - x1 > 3 and y2 - y1 > 3:
                patch = cv2.resize(spot, (x2 - x1, y2 - y1))[:, :, None] / 255
                video[f, y1:y2, x1:x2] = np.maximum(video[f, y1:y2, x1:x2], patch)
    return torch.from_numpy(video)
