"""What every EasyAnimate node module shares: the category, the models/EasyAnimate/ folder and its listing."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from easyanimate_core import micro
from easyanimate_core.vae import VAE_V4, VAE_V5, VAE_V51, VAEConfig

CATEGORY = "EasyAnimate"
FOLDER = "EasyAnimate"
# The versions the nodes run, newest first, with the VAE each one's latents come from.
VAE_CONFIGS = {"V5.1": VAE_V51, "V5": VAE_V5, "V4": VAE_V4}
NATIVE_VERSIONS = tuple(VAE_CONFIGS)
# The micro model shipped inside the pack: listed first by every loader (so a new node defaults to it) and its
# LoRAs in ComfyUI's loras/ list; both stay out of the lists while its weights are absent.
BUNDLED_MICRO = "EasyAnimate-Micro (bundled)"
BUNDLED_TOOLTIP = f"{BUNDLED_MICRO}: the pack's own small model (64 x 64, 17 frames, seconds on a CPU)."


def frame_rule(vae: VAEConfig) -> tuple[int, int]:
    """Valid frame counts as (step, offset): frames = step * k + offset >= 1 (and 1 itself: a still image)."""
    # As MagvitVAE checks them: mag VAE, frame 0 alone then chunks of temporal_compression frames -> 4k + 1;
    # slice VAE, whole encoder chunks -> multiples of mini_batch_encoder (8).
    if vae.temporal_mode == "mag":
        return vae.temporal_compression, 1
    return vae.mini_batch_encoder, 0


folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
folder_paths.add_model_folder_path("loras", str(micro.MICRO_MODEL / "loras"))


def model_folders(part: str) -> list[str]:
    """Model folders that have a ``part`` subfolder (e.g. "transformer"): the bundled micro model, then those
    under models/EasyAnimate/."""
    names = set()
    for root in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(root):
            names.update(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n, part)))
    names.discard(BUNDLED_MICRO)  # a user's folder of that name is shadowed
    bundled_path = micro.shipped_micro_model()
    if bundled_path is not None and (bundled_path / part).is_dir():
        names.add(BUNDLED_MICRO)
    return bundled_first(names)


def bundled_first(names) -> list[str]:
    """Choices sorted with the bundled micro model first, since a new node defaults to the first choice."""
    return sorted(set(names), key=lambda name: (name != BUNDLED_MICRO, name))


def model_folder_path(name: str) -> Path:
    """The full path of a folder listed by ``model_folders``."""
    if name == BUNDLED_MICRO and (bundled_path := micro.shipped_micro_model()) is not None:
        return bundled_path
    for root in folder_paths.get_folder_paths(FOLDER):
        path = Path(root) / name
        if path.is_dir():
            return path
    raise FileNotFoundError(f"no folder {name!r} under {folder_paths.get_folder_paths(FOLDER)}")


def folder_input(part: str, tooltip: str) -> tuple:
    names = model_folders(part)
    return (names, {"tooltip": tooltip + f" Folders under models/{FOLDER}/ with a {part}/ subfolder."})
