"""Regenerate tests/data/control_reference.npz from the official EasyAnimate code (camera and trajectory parity).

    python bench/camera_reference.py --official /path/to/EasyAnimate      (a checkout of aigc-apps/EasyAnimate)

Runs the official functions on fixed inputs: the camera presets (comfyui/utils.py: get_camera_motion, alone and
summed as the Combine node does, combine_camera_motion for joins), the trajectory rows its CameraTrajectory node
builds, and process_pose_params (easyanimate/data/dataset_image_video.py, CameraCtrl's ray_condition) at two aspect
ratios, and the trajectory videos of its CreateTrajectoryBasedOnKJNodes node (comfyui/comfyui_nodes.py) for one
and two tracks. Those modules import their whole stacks, so only the needed functions are taken from the
source (by name, with ast) and run with numpy, torch, cv2, einops and packaging. Nothing of it is copied into
the pack.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "control_reference.npz"
TRACKS = (  # frames of (x, y); the second track leaves the frame at the right
    [(10, 12), (20, 18), (33, 25), (47, 30), (60, 41)],
    [(50, 5), (58, 9), (66, 14), (70, 20), (80, 26)],
)
TRAJECTORY_SIZE = (48, 72)  # height, width
CASES = {  # name: (presets moving together, speed, frames)
    "pan_left": (["Pan Left"], 1.0, 9),
    "zoom_in_cw": (["Zoom In", "CW"], 0.7, 9),
    "pan_up_acw": (["Pan Up", "ACW"], 1.3, 5),
}
SIZES = ((64, 48), (48, 64))  # width, height: both branches of the aspect-ratio rescale
INTRINSICS = (0.474812461, 0.844111024, 0.5, 0.5)


def _functions(path: Path, wanted: set[str], namespace: dict) -> dict:
    """The top-level functions / classes named ``wanted`` in the file at ``path``, run in ``namespace``."""
    nodes = [n for n in ast.parse(path.read_text()).body if getattr(n, "name", None) in wanted]
    exec(compile(ast.Module(body=nodes, type_ignores=[]), path.name, "exec"), namespace)
    return {name: namespace[name] for name in wanted}


def official_functions(root: Path) -> dict:
    spec = importlib.util.spec_from_file_location("official_camera_utils", root / "comfyui" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    import cv2
    from einops import rearrange
    from packaging import version as pver

    namespace = {"np": np, "torch": torch, "rearrange": rearrange, "pver": pver, "cv2": cv2, "json": json}
    wanted = {"Camera", "custom_meshgrid", "get_relative_pose", "ray_condition", "process_pose_params"}
    found = _functions(root / "easyanimate" / "data" / "dataset_image_video.py", wanted, namespace)
    nodes = {"gen_gaussian_heatmap", "CreateTrajectoryBasedOnKJNodes"}
    found |= _functions(root / "comfyui" / "comfyui_nodes.py", nodes, dict(namespace))
    return {"utils": utils, **found}


def trajectory_rows(motion: np.ndarray) -> np.ndarray:
    """What the official CameraTrajectory node and sampler make of a motion: [0, fx, fy, cx, cy, 0, 0, w2c rows]."""
    rows = json.loads(json.dumps([[*INTRINSICS, 0, 0, *cp[0], *cp[1], *cp[2]] for cp in motion.tolist()]))
    cam = np.array([[float(x) for x in row] for row in rows])
    return np.concatenate([np.zeros_like(cam[:, :1]), cam], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="a checkout of aigc-apps/EasyAnimate")
    args = ap.parse_args()
    f = official_functions(args.official)
    utils = f["utils"]
    arrays = {}
    for name, (presets, speed, frames) in CASES.items():
        angle = sum(np.array(utils.CAMERA[p]["angle"]) for p in presets)
        translation = sum(np.array(utils.CAMERA[p]["T"]) for p in presets)
        motion = utils.get_camera_motion(angle, translation, speed, frames)
        arrays[f"{name}/motion"] = motion
        rows = trajectory_rows(motion)
        arrays[f"{name}/rows"] = rows
        for width, height in SIZES:
            rays = f["process_pose_params"](rows, width=width, height=height)
            arrays[f"{name}/rays_{width}x{height}"] = rays.numpy()
    first = utils.get_camera_motion(np.array([0.0, 0, 0]), np.array([1.0, 0, 0]), 1.0, 5)
    second = utils.get_camera_motion(np.array([0.0, 0, 1]), np.array([0.0, 0, 0]), 1.0, 4)
    arrays["join/first"], arrays["join/second"] = first.copy(), second.copy()
    arrays["join/joined"] = utils.combine_camera_motion(first, second)
    node = f["CreateTrajectoryBasedOnKJNodes"]()
    masks = torch.zeros(len(TRACKS[0]), *TRAJECTORY_SIZE)
    as_json = [json.dumps([{"x": x, "y": y} for x, y in track]) for track in TRACKS]
    arrays["trajectory/one"] = node.createtrajectory(as_json[0], masks)[0].numpy()
    arrays["trajectory/two"] = node.createtrajectory(as_json, masks)[0].numpy()
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({len(arrays)} arrays)")


if __name__ == "__main__":
    main()
