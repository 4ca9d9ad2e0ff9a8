"""Checks of command-line input that run before any weight, dataset or output is touched.

Each raises ValueError (the CLI prints it and exits with code 2) naming the flag, the value, what is wrong
and how to fix it:

    check_number(flag, value, low=..., high=..., low_open=..., integer=...)
    check_input(flag, path, kind)                       an existing file / folder / readable image
    check_output_file(flag, path, overwrite, size)      a file we may create or (with --overwrite) replace
    check_output_folder(flag, path, needed_bytes)       a folder we may create or write into
    check_video_size(frames, height, width, vae_config, flags)   the VAE's frame and size rules
    check_memory(needed_bytes, what, device, flags)     a lower-bound estimate against the memory there is
    generation_memory_bytes(...), training_memory_bytes(...)   those lower bounds
    transformer_skeleton(info), lora_header(path)      a model's layers and a LoRA's shapes without their weights
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

import torch

GIB = 2**30


def check_number(
    flag: str,
    value: float | int | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    fix: str = "",
) -> None:
    """``value`` is finite and within [low, high] (``low_open``: above ``low``); None (not given) passes."""
    if value is None:
        return
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    wrong = not math.isfinite(value)
    wrong = wrong or (low is not None and (value <= low if low_open else value < low))
    wrong = wrong or (high is not None and value > high)
    if wrong:
        rule = " and ".join(["a finite number", *bounds]) if bounds else "a finite number"
        raise ValueError(f"{flag} {value}: must be {rule}{'; ' + fix if fix else ''}")


def check_input(flag: str, path: str | Path, kind: str = "file") -> Path:
    """``path`` exists, is readable and is a ``kind``: "file", "folder", "image", or "any" / "video" (a file or a
    folder; a video may be a folder of frames)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{flag} {path}: no such {'folder' if kind == 'folder' else 'file'}")
    if kind == "folder" and not p.is_dir():
        raise ValueError(f"{flag} {path}: is a file; give a folder")
    if kind in ("file", "image") and not p.is_file():
        raise ValueError(f"{flag} {path}: is a folder; give a file")
    if kind == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                im.verify()
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{flag} {path}: not a readable image ({e}); give a PNG, JPEG or WebP file") from e
    if not os.access(p, os.R_OK):
        raise ValueError(f"{flag} {path}: not readable by this user; fix its permissions")
    return p


def existing_ancestor(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists (where a new ``path`` would be created)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def check_output_folder(flag: str, path: str | Path, needed_bytes: int = 0) -> Path:
    """``path`` is a folder we can create (or that exists) and write in, with ``needed_bytes`` free there."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path}: is a file; give a folder (a new or an existing one)")
    _check_writable(flag, path, p, needed_bytes)
    return p


def _check_writable(flag: str, path: str | Path, folder: Path, needed_bytes: int) -> None:
    """``folder`` (``path``'s, or ``path`` itself) exists or can be made, is writable and has room."""
    base = existing_ancestor(folder)
    if not base.is_dir():
        raise ValueError(f"{flag} {path}: {base} is a file, so nothing can be written under it; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {base} (permission denied); choose a folder you can write")
    free = shutil.disk_usage(base).free
    if needed_bytes > free:
        raise ValueError(
            f"{flag} {path}: the output needs about {needed_bytes / GIB:.2f} GiB but {base} has "
            f"{free / GIB:.2f} GiB free; free some space or write elsewhere"
        )


def check_output_file(flag: str, path: str | Path, overwrite: bool, needed_bytes: int = 0) -> Path:
    """``path`` is a file we may write: its folder is writable with room for it, and it does not exist
    (or ``overwrite`` allows replacing a file; a folder in its place is never replaced)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name (or a new folder name for PNG frames)")
    if p.exists() and not overwrite:
        raise ValueError(f"{flag} {path}: the file exists; pass --overwrite to replace it, or choose another name")
    _check_writable(flag, path, p.parent, needed_bytes)
    return p


def io_error_message(e: OSError, hint: str = "") -> str:
    """One line for a failed read or write (a full disk, a lost mount, permissions) instead of a traceback."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"the disk is full writing{where}: free some space there"
    else:
        what = f"input/output error on{where or ' a file'}: {e.strerror or e}"
    return f"{what}{'; ' + hint if hint else ''} (nothing half-written was kept)"


# --------------------------------------------------------------------------------------------------
# Models from their headers
# --------------------------------------------------------------------------------------------------


def transformer_skeleton(info) -> torch.nn.Module:
    """The transformer of ``info`` on the meta device: its layers and shapes without memory or weights."""
    from .transformer import EasyAnimateTransformer3D
    from .transformer_v3 import EasyAnimateV3Transformer3D, TransformerV3Config
    from .transformer_v4 import EasyAnimateV4Transformer3D

    with torch.device("meta"):
        if info.version == "V4":
            return EasyAnimateV4Transformer3D(info.config)
        if isinstance(info.config, TransformerV3Config):
            return EasyAnimateV3Transformer3D(info.config)
        return EasyAnimateTransformer3D(info.config)


def lora_header(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors as meta tensors of their shapes (alphas, one number each, read for real)."""
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                tensors[key] = f.get_tensor(key) if math.prod(shape) == 1 else torch.empty(shape, device="meta")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"not a readable safetensors file ({e})") from e
    return tensors


# --------------------------------------------------------------------------------------------------
# Sizes and memory
# --------------------------------------------------------------------------------------------------


def check_video_size(frames: int, height: int, width: int, vae_config, flags: dict[str, str]) -> None:
    """ValueError naming the flag (``flags``: "frames" / "height" / "width" -> its flag) of a size the VAE does
    not take (its own rule and message, with the nearest valid values)."""
    valid = vae_config.pixel_multiple
    for name, size in (
        ("frames", (frames, valid, valid)),
        ("height", (1, height, valid)),
        ("width", (1, valid, width)),
    ):
        try:
            vae_config.check_video_size(*size)  # one dimension at a time, to name its flag
        except ValueError as e:
            raise ValueError(f"{flags[name]}: {e}") from e


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, description) of the memory a run on ``device`` can use: the GPU's total, or the RAM available."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, f"{torch.cuda.get_device_name(device)} ({total / GIB:.1f} GiB)"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available, f"this machine's available RAM ({available / GIB:.1f} GiB)"


def generation_memory_bytes(
    frames: int, height: int, width: int, vae_config, hidden_size: int, window_frames: int | None = None
) -> int:
    """A lower bound of the memory a generation of this size needs beyond the weights.

    Counted: the decoded video in float32 twice (the VAE's output and the clamped copy written out), the VAE
    decoder's first full-resolution activation (its first block's channels, one decoder mini-batch of frames,
    float32) and the transformer's hidden states for every latent token of one model call (two branches for
    guidance, float32; ``window_frames``: the frames of one context window). Attention, other activations and the
    weights come on top, so a size refused here can never run.
    """
    pixels = frames * height * width
    video = 2 * pixels * 3 * 4
    # The image VAE (V1) decodes one frame per call.
    per_call = getattr(vae_config, "mini_batch_decoder", 1) * vae_config.temporal_compression
    decoder_frames = min(frames, max(1, per_call))
    vae_activation = decoder_frames * height * width * vae_config.block_out_channels[0] * 4
    m = vae_config.pixel_multiple
    tokens = vae_config.latent_frames(min(frames, window_frames or frames)) * (height // m) * (width // m)
    transformer = 2 * tokens * hidden_size * 4
    return video + vae_activation + transformer


def training_memory_bytes(info, mode: str, dtype: torch.dtype, clip_tokens: int, samples: int, shards: int) -> int:
    """A lower bound of the memory one training process needs: the transformer's weights (full fine-tuning:
    float32 weights, gradients and Adam's two moments, divided over ``shards`` FSDP processes) and, for each of the
    ``samples`` of a forward pass, one hidden state per transformer block kept for the backward pass (a clip of
    ``clip_tokens`` tokens). Real runs keep several activations a block (fewer with gradient checkpointing)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights = info.num_params * 16 // shards if mode == "full" else info.num_params * itemsize
    hidden = info.config.num_attention_heads * info.config.attention_head_dim
    return weights + samples * clip_tokens * hidden * info.config.num_layers * itemsize


def check_memory(needed_bytes: int, what: str, device: torch.device, flags: str) -> None:
    """ValueError when ``needed_bytes`` (a lower bound) exceed the memory of ``device``; it prints both numbers."""
    available, where = available_memory(device)
    if needed_bytes > available:
        raise ValueError(
            f"{flags}: {what} needs at least {needed_bytes / GIB:.1f} GiB (a lower bound); {where}: lower {flags}"
        )
