"""Camera and trajectory control for V5.1 Control-Camera and Control models (easyanimate_core.camera / .trajectory).

EasyAnimate Camera Motion       presets moving together (chain one after another through ``camera``)
EasyAnimate Camera From File    the official pose file (CameraCtrl text format) from ComfyUI's input folder
EasyAnimate Camera Control      camera poses (+ reference image) -> conditioning and latent for a Camera model
EasyAnimate Trajectory          tracks of points (the official coordinates string) -> a control video IMAGE
                                for EasyAnimate Control Video
"""

from __future__ import annotations

from pathlib import Path

import folder_paths
import numpy as np
import torch

from easyanimate_core.camera import (
    CAMERA_CHANNELS,
    INTRINSICS,
    PRESETS,
    camera_motion,
    join_motions,
    pose_entries,
    read_pose_file,
)
from easyanimate_core.pipeline import control_latents
from easyanimate_core.trajectory import parse_tracks, trajectory_video

from .common import CATEGORY, checked_name
from .conditioning import _attach, _checked_size, _common_inputs, _latent_shape, _load, _validate_size
from .latents import empty_video_latent
from .vae_nodes import easyanimate_vae

CAMERA = "EASYANIMATE_CAMERA"  # per-frame world-to-camera [R | T] [F, 3, 4] (numpy), intrinsics on the way out
PRESET_NAMES = list(PRESETS)


class EasyAnimateCameraMotion:
    """A camera motion from presets that move together (e.g. Pan Left + Zoom In); given ``camera``, this motion
    continues from where that one ends (the official Camera Join)."""

    @classmethod
    def INPUT_TYPES(cls):
        preset = {"tooltip": "a preset motion; the presets of this node move together"}
        return {
            "required": {
                "motion": (PRESET_NAMES, {"default": "Pan Left", **preset}),
                "motion_2": (PRESET_NAMES, {"default": "Static", **preset}),
                "speed": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                    "tooltip": "how far the camera moves over these frames"}),
                "frames": ("INT", {"default": 49, "min": 1, "max": 1025, "tooltip": "frames of this motion"}),
            },
            "optional": {"camera": (CAMERA, {"tooltip": "an earlier motion this one continues"})},
        }  # fmt: skip

    RETURN_TYPES = (CAMERA,)
    RETURN_NAMES = ("camera",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, motion, motion_2, speed, frames, camera=None):
        poses = camera_motion([motion, motion_2], speed, frames)
        return (poses if camera is None else join_motions(camera, poses),)


class EasyAnimateCameraFromFile:
    """Camera poses from a file in the official (CameraCtrl) text format in ComfyUI's input folder."""

    @classmethod
    def INPUT_TYPES(cls):
        root = Path(folder_paths.get_input_directory())
        files = sorted(p.name for p in root.glob("*.txt")) if root.is_dir() else []
        return {"required": {"pose_file": (files or [""], {"tooltip": "a .txt pose file in ComfyUI's input folder"})}}

    RETURN_TYPES = (CAMERA,)
    RETURN_NAMES = ("camera",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, pose_file):
        root = Path(folder_paths.get_input_directory()).resolve()
        path = (root / checked_name(pose_file)).resolve()
        if not path.is_file() or not path.is_relative_to(root):
            raise ValueError(f"{pose_file!r} is not a file in ComfyUI's input folder; put the pose file there")
        rows = read_pose_file(path)
        return (rows[:, 7:].reshape(-1, 3, 4),)


class EasyAnimateCameraControl:
    """Conditioning for a V5.1 Control-Camera model: the camera's Plücker rays (and a reference image)."""

    @classmethod
    def INPUT_TYPES(cls):
        inputs = _common_inputs()
        inputs["camera"] = (CAMERA, {"tooltip": "EasyAnimate Camera Motion or Camera From File"})
        return {
            "required": inputs,
            "optional": {"ref_image": ("IMAGE", {"tooltip": "a reference image for the look (first of the batch)"})},
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, frames):
        return _validate_size(width, height, frames)

    def encode(self, positive, negative, vae, width, height, frames, batch_size, camera, ref_image=None):
        if len(camera) < frames:
            raise ValueError(f"the camera has {len(camera)} poses; {frames} frames need at least {frames}")
        core = easyanimate_vae(vae)
        size = _checked_size(core, width, height, frames)
        latent = empty_video_latent(core.config, width, height, frames, batch_size)
        channels = CAMERA_CHANNELS + core.config.latent_channels
        device = _load(vae, size)
        with torch.no_grad():
            control = control_latents(
                core,
                None,
                None if ref_image is None else ref_image[0, ..., :3],
                _latent_shape(latent),
                channels,
                size,
                device,
                camera=pose_entries(np.asarray(camera), INTRINSICS),
            )
        return (*_attach(positive, negative, {"easyanimate_control_latents": control}), latent)


class EasyAnimateTrajectory:
    """A control video of tracks (Gaussian spots along points, as the official trajectory node) for EasyAnimate
    Control Video; coordinates as KJNodes' spline editor writes them: [{"x": .., "y": ..}, ...] one per frame."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "coordinates": ("STRING", {"multiline": True, "default": '[{"x": 100, "y": 200}, {"x": 140, "y": 200}]',
                                           "tooltip": "one point a frame, in output pixels; a list of such lists for "
                                           "several tracks"}),
                "width": ("INT", {"default": 672, "min": 16, "max": 4096, "step": 16, "tooltip": "video width"}),
                "height": ("INT", {"default": 384, "min": 16, "max": 4096, "step": 16, "tooltip": "video height"}),
            }
        }  # fmt: skip

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("video",)
    FUNCTION = "draw"
    CATEGORY = CATEGORY

    def draw(self, coordinates, width, height):
        import json

        text = coordinates.strip()
        try:
            parsed = json.loads(text.replace("'", '"'))
        except ValueError as e:
            raise ValueError(f'coordinates must be JSON: [{{"x": .., "y": ..}}, ...] ({e})') from e
        many = isinstance(parsed, list) and parsed and isinstance(parsed[0], list)
        return (trajectory_video(parse_tracks(parsed if many else [parsed]), height, width).float(),)


NODE_CLASS_MAPPINGS = {
    "EasyAnimateCameraMotion": EasyAnimateCameraMotion,
    "EasyAnimateCameraFromFile": EasyAnimateCameraFromFile,
    "EasyAnimateCameraControl": EasyAnimateCameraControl,
    "EasyAnimateTrajectory": EasyAnimateTrajectory,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateCameraMotion": "EasyAnimate Camera Motion",
    "EasyAnimateCameraFromFile": "EasyAnimate Camera From File",
    "EasyAnimateCameraControl": "EasyAnimate Camera Control",
    "EasyAnimateTrajectory": "EasyAnimate Trajectory",
}
