"""Camera control for V5.1 Control-Camera models: camera motions -> per-frame poses -> Plücker rays -> latents.

    motion = camera_motion(["Pan Left", "Zoom In"], speed=1.0, frames=49)   [F, 3, 4] world-to-camera [R | T]
    motion = join_motions(first, second)                                    one motion after the other
    entries = pose_entries(motion)                                          the official pose rows (intrinsics + w2c)
    entries = read_pose_file("poses.txt")                                   the official (CameraCtrl) text format
    rays = plucker_rays(entries, width=672, height=384)                     [F, H, W, 6] float32

Behaviour follows the official code (EasyAnimate's comfyui/utils.py camera presets, which come from
ComfyUI-CameraCtrl-Wrapper, and process_pose_params / ray_condition from CameraCtrl, as EasyAnimate ships them),
checked against arrays those functions produced (tests/test_camera.py; bench/camera_reference.py regenerates them):

* A preset is a rotation (Euler angles x, y, z, in units of pi/3) and a translation (units of 1.5); frame i of n
  applies i/n * speed of it, R = Rz Ry Rx. Presets given together add their angles and translations.
* A pose row is [frame, fx, fy, cx, cy, 0, 0, w2c 3x4 by rows]; intrinsics are fractions of the frame, the default
  ones those of the official node (fx 0.474812461, fy 0.844111024 for 1280 x 720 footage, centre 0.5).
* Rays: poses relative to the first camera; fx or fy is rescaled when the video's aspect differs from the
  poses' 1280 x 720; each pixel centre gives a unit direction d in world space and the camera origin o; the
  Plücker ray is (o x d, d).
* The model reads the rays resized to the latent grid (frame 0 on its own, as the inpaint mask), times
  CAMERA_LATENT_SCALE (pipeline.control_latents).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

BASE_ANGLE = math.pi / 3  # radians per unit of a preset's angle at speed 1, over the whole clip
BASE_TRANSLATION = 1.5  # distance per unit of a preset's translation at speed 1, over the whole clip
PRESETS = {  # name: (Euler angles x, y, z; translation)
    "Static": ((0, 0, 0), (0, 0, 0)),
    "Pan Up": ((0, 0, 0), (0, 1, 0)),
    "Pan Down": ((0, 0, 0), (0, -1, 0)),
    "Pan Left": ((0, 0, 0), (1, 0, 0)),
    "Pan Right": ((0, 0, 0), (-1, 0, 0)),
    "Zoom In": ((0, 0, 0), (0, 0, -2)),
    "Zoom Out": ((0, 0, 0), (0, 0, 2)),
    "ACW": ((0, 0, 1), (0, 0, 0)),
    "CW": ((0, 0, -1), (0, 0, 0)),
}
INTRINSICS = (0.474812461, 0.844111024, 0.5, 0.5)  # fx, fy, cx, cy as fractions of the frame (official node)
POSE_SIZE = (1280, 720)  # the width and height the official poses were made for
CAMERA_LATENT_SCALE = 6.0  # the official pipeline's factor on the resized rays
CAMERA_CHANNELS = 6  # a Plücker ray: o x d, d


def preset_name(name: str) -> str:
    """The preset called ``name`` ("pan_left", "Pan Left", "zoom-in" ...), or a ValueError listing them."""
    wanted = name.strip().lower().replace("_", " ").replace("-", " ")
    for preset in PRESETS:
        if preset.lower() == wanted:
            return preset
    raise ValueError(f"unknown camera motion {name!r}; choose from {', '.join(PRESETS)} (join several with +)")


def _rotation(angles: np.ndarray) -> np.ndarray:
    """R = Rz Ry Rx for Euler angles (x, y, z) in radians."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ (ry @ rx)


def camera_motion(presets: list[str], speed: float = 1.0, frames: int = 49) -> np.ndarray:
    """World-to-camera [R | T] per frame [frames, 3, 4] for ``presets`` moving together at ``speed``."""
    if frames < 1:
        raise ValueError(f"a camera motion needs at least 1 frame, got {frames}")
    angle = np.zeros(3)
    translation = np.zeros(3)
    for name in presets:
        a, t = PRESETS[preset_name(name)]
        angle, translation = angle + np.array(a, float), translation + np.array(t, float)
    poses = []
    for i in range(frames):
        share = i / frames * speed
        rotation = _rotation(share * BASE_ANGLE * angle)
        poses.append(np.concatenate([rotation, share * BASE_TRANSLATION * translation.reshape(3, 1)], axis=1))
    return np.stack(poses)


def join_motions(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``second`` continued from where ``first`` ends (the official CameraJoin): [F1 + F2, 3, 4]."""
    last = first[-1]
    rotation, rotation_inv, translation = last[:, :3], last[:, :3].T, last[:, 3]
    moved = []
    for pose in second:
        r = pose[:, :3] @ rotation
        moved.append(np.concatenate([r, (pose[:, 3] + r @ rotation_inv @ translation).reshape(3, 1)], axis=1))
    return np.concatenate([first, np.stack(moved)], axis=0)


def pose_entries(motion: np.ndarray, intrinsics: tuple[float, float, float, float] = INTRINSICS) -> np.ndarray:
    """The official pose rows [frames, 19]: frame index 0, fx, fy, cx, cy, 0, 0, then w2c [R | T] by rows."""
    fx, fy, cx, cy = intrinsics
    rows = [[0.0, fx, fy, cx, cy, 0.0, 0.0, *pose.reshape(-1).tolist()] for pose in motion]
    return np.array(rows, dtype=np.float64)


def read_pose_file(path: str | Path) -> np.ndarray:
    """Pose rows [frames, 19] from an official camera file (a header line, then one row of 19 numbers a frame)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.split() for line in lines if line.strip()]
    if not rows or any(len(r) != 19 for r in rows):
        raise ValueError(
            f"{path}: expected a header line, then rows of 19 numbers (frame fx fy cx cy 0 0 and a 3x4 "
            "world-to-camera matrix), one per frame"
        )
    try:
        return np.array([[float(v) for v in r] for r in rows])
    except ValueError as e:
        raise ValueError(f"{path}: {e}; every pose row must be 19 numbers") from e


def _relative_camera_to_world(entries: np.ndarray) -> np.ndarray:
    """Camera-to-world matrices [F, 4, 4] relative to the first camera (float32)."""
    w2c = np.tile(np.eye(4), (len(entries), 1, 1))
    w2c[:, :3, :] = entries[:, 7:].reshape(-1, 3, 4)
    c2w = np.linalg.inv(w2c)
    first_to_origin = w2c[0]  # the official target pose is the identity (cam_to_origin 0)
    rel = [np.eye(4)] + [first_to_origin @ c for c in c2w[1:]]
    return np.array(rel, dtype=np.float32)


def plucker_rays(entries: np.ndarray, width: int, height: int, pose_size: tuple[int, int] = POSE_SIZE) -> torch.Tensor:
    """Plücker rays [frames, height, width, 6] (o x d, d) of every pixel centre, as the official pipeline makes them."""
    fx, fy, cx, cy = (entries[:, k].astype(np.float64).copy() for k in (1, 2, 3, 4))
    pose_ratio, video_ratio = pose_size[0] / pose_size[1], width / height
    if pose_ratio > video_ratio:
        fx = height * pose_ratio * fx / width
    else:
        fy = width / pose_ratio * fy / height
    k = torch.as_tensor(np.stack([fx * width, fy * height, cx * width, cy * height], 1).astype(np.float32))  # [F, 4]
    c2w = torch.as_tensor(_relative_camera_to_world(entries))  # [F, 4, 4]
    j, i = torch.meshgrid(
        torch.linspace(0, height - 1, height, dtype=torch.float32),
        torch.linspace(0, width - 1, width, dtype=torch.float32),
        indexing="ij",
    )
    i, j = i.reshape(1, -1) + 0.5, j.reshape(1, -1) + 0.5  # [1, H*W] pixel centres
    xs = (i - k[:, 2:3]) / k[:, 0:1]
    ys = (j - k[:, 3:4]) / k[:, 1:2]
    directions = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # [F, H*W, 3]
    directions = directions / directions.norm(dim=-1, keepdim=True)
    rays_d = directions @ c2w[:, :3, :3].transpose(-1, -2)
    rays_o = c2w[:, None, :3, 3].expand_as(rays_d)
    plucker = torch.cat([torch.linalg.cross(rays_o, rays_d, dim=-1), rays_d], dim=-1)
    return plucker.reshape(len(entries), height, width, 6)
