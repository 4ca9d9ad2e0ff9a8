"""What every EasyAnimate node module shares: the category, the models/EasyAnimate/ folder and its listing."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PureWindowsPath

import folder_paths

from easyanimate_core import micro
from easyanimate_core.image_vae import IMAGE_VAE_SD
from easyanimate_core.vae import VAE_V2, VAE_V3, VAE_V4, VAE_V5, VAE_V51, VAEConfig

CATEGORY = "EasyAnimate"
FOLDER = "EasyAnimate"
# The versions the nodes run, newest first, with the VAE each one's latents come from.
VAE_CONFIGS = {"V5.1": VAE_V51, "V5": VAE_V5, "V4": VAE_V4, "V3": VAE_V3, "V2": VAE_V2, "V1": IMAGE_VAE_SD}
NATIVE_VERSIONS = tuple(VAE_CONFIGS)
# The micro model shipped inside the pack: listed first by every loader (so a new node defaults to it) and its
# LoRAs in ComfyUI's loras/ list; both stay out of the lists while its weights are absent.
BUNDLED_MICRO = "EasyAnimate-Micro (bundled)"
BUNDLED_TOOLTIP = f"{BUNDLED_MICRO}: the pack's own small model (64 x 64, 17 frames, seconds on a CPU)."


def sampling_step(sample_sigmas, sigma) -> tuple[int, int] | None:
    """(step, steps) of a model call at ``sigma`` in ComfyUI's sampling loop over ``sample_sigmas`` (the
    transformer option ComfyUI sets); None outside one."""
    if sample_sigmas is None or sigma is None or len(sample_sigmas) < 2:
        return None
    steps = sample_sigmas[:-1].to(sigma)
    return int((steps - sigma.flatten()[0]).abs().argmin()), len(steps)


def frame_rule(vae: VAEConfig) -> tuple[int, int]:
    """Valid frame counts as (step, offset): frames = step * k + offset >= 1 (and 1 itself: a still image)."""
    # As the VAEs check them: mag VAE, frame 0 alone then chunks of temporal_compression frames -> 4k + 1;
    # V4 / V3 slice and V2 MagViT VAEs, whole encoder chunks -> multiples of mini_batch_encoder (8, 8, 9); V1's
    # image VAE, any count.
    if vae.temporal_mode == "mag":
        return vae.temporal_compression, 1
    if vae.temporal_mode == "image":
        return 1, 0
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


def checked_name(name: str) -> str:
    """A user-supplied model name as a normalised relative path ("a/b.safetensors"); ValueError (naming the input,
    the problem and the fix) for an empty name, an absolute path or a ``..`` that could leave a model folder."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ValueError(f"model name {name!r} is empty or not a file name; pick one of the listed models")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or PureWindowsPath(name).drive:
        raise ValueError(
            f"model name {name!r} is an absolute path; models load only from ComfyUI's model folders: put the model "
            "there and pick it from the list"
        )
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(
            f"model name {name!r} contains '..'; models load only from ComfyUI's model folders: put the model there "
            "and pick it from the list"
        )
    return "/".join(parts)


def resolve_in_folders(kind: str, name: str, accept: Callable[[Path], bool] = Path.exists) -> Path | None:
    """The path of ``name`` in the first of ComfyUI's ``kind`` folders (e.g. "loras") where ``accept`` holds, or None.

    The one place every loader turns a user-supplied name into a path: the name is checked (``checked_name``) and
    the path it finds must resolve inside one of the ``kind`` folders; a symlink that leads out of them is refused
    with a ValueError saying so (extra_model_paths.yaml adds folders elsewhere on disk)."""
    relative = checked_name(name)
    roots = folder_paths.get_folder_paths(kind)
    real_roots = [Path(root).resolve() for root in roots]
    for root in roots:
        path = Path(root) / relative
        if not accept(path):
            continue
        real = path.resolve()
        if not any(real == r or real.is_relative_to(r) for r in real_roots):
            raise ValueError(
                f"{kind}/{relative} is a link to {real}, outside ComfyUI's {kind} folders; move the model into "
                f"models/{kind}/ or add its folder to extra_model_paths.yaml instead of linking it"
            )
        return path
    return None


def model_file(kind: str, name: str) -> Path:
    """The file ``name`` in ComfyUI's ``kind`` folders (see ``resolve_in_folders``); FileNotFoundError if absent."""
    path = resolve_in_folders(kind, name, Path.is_file)
    if path is None:
        raise FileNotFoundError(f"{name!r} is not a file in ComfyUI's {kind} folders; pick one of the listed files")
    return path


def model_folder_path(name: str) -> Path:
    """The full path of a folder listed by ``model_folders``."""
    if name == BUNDLED_MICRO and (bundled_path := micro.shipped_micro_model()) is not None:
        return bundled_path
    path = resolve_in_folders(FOLDER, name, Path.is_dir)
    if path is None:
        raise FileNotFoundError(f"no folder {name!r} under {folder_paths.get_folder_paths(FOLDER)}")
    return path


def validation_error(check: Callable[[], str | None]) -> str | bool:
    """A VALIDATE_INPUTS answer: ``check``'s message, the message of a refused name, or True."""
    try:
        return check() or True
    except (ValueError, FileNotFoundError) as error:
        return str(error)


# The bundled workflows' example images and videos (LoadImage / LoadVideo read them from ComfyUI's input folder).
EXAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "workflows" / "inputs"


def install_example_inputs() -> list[str]:
    """Copy the example inputs missing from ComfyUI's input folder into it (a file of the same name already there
    is left alone), so every bundled workflow opens with its media present; returns the names copied."""
    target = Path(folder_paths.get_input_directory())
    copied = []
    for source in sorted(EXAMPLE_INPUTS.glob("easyanimate_*")):
        destination = target / source.name
        if destination.exists():
            continue
        try:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
            copied.append(source.name)
        except OSError as error:  # a read-only input folder: the workflows still open, without a preview
            logging.warning("EasyAnimate: could not copy the example input %s into %s: %s", source.name, target, error)
    return copied


def folder_input(part: str, tooltip: str) -> tuple:
    names = model_folders(part)
    return (names, {"tooltip": tooltip + f" Folders under models/{FOLDER}/ with a {part}/ subfolder."})
