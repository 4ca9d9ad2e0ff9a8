"""Reading images and videos, and writing videos with the generation settings in their metadata.

Frames are float tensors in [0, 1]: an image is [H, W, 3], a video [F, H, W, 3] (ComfyUI's IMAGE
layout). Writers pick the format from the path: ``.mp4`` (H.264 through imageio's bundled ffmpeg;
settings in the ``comment`` tag), ``.gif`` (comment extension), ``.webp`` (XMP packet), or a folder
(no suffix: numbered PNGs, settings in each PNG's text chunk). Files are written to a temporary name
beside the target and renamed when complete, so an interrupted run never leaves a half-written video.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_dir, atomic_path, scratch_dir

METADATA_KEY = "easyanimate"
VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as [H, W, 3] float in [0, 1]; ValueError naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(rgb.copy()).float() / 255


def read_video(path: str | Path, max_frames: int | None = None) -> torch.Tensor:
    """A video file (or a folder of images) as [F, H, W, 3] float in [0, 1]."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not files:
            raise ValueError(f"cannot read video {path}: the folder holds no images")
        return torch.stack([read_image(p) for p in files[:max_frames]])
    import imageio.v3 as iio

    frames = []
    try:
        for frame in iio.imiter(path):
            frames.append(torch.from_numpy(np.asarray(frame)[..., :3].copy()))
            if max_frames is not None and len(frames) == max_frames:
                break
    except Exception as e:  # imageio raises many kinds for unreadable input
        raise ValueError(f"cannot read video {path}: {e}") from e
    if not frames:
        raise ValueError(f"cannot read video {path}: no frames")
    return torch.stack(frames).float() / 255


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    # Frame by frame: a long clip never has a second float copy of itself in memory.
    out = np.empty(tuple(frames.shape), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = (frame.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return out


def write_video(path: str | Path, frames: torch.Tensor, fps: float = 8.0, metadata: dict | None = None) -> Path:
    """Write [F, H, W, 3] frames in [0, 1] to ``path`` (format from its suffix), atomically.

    A file replaces an existing one of that name. A folder of PNG frames goes into an existing folder beside
    what it holds: only frames an earlier run of ours wrote there are replaced (``frame_conflicts`` lists
    the files that would stop it; the CLI checks them before any work).
    """
    path = Path(path)
    data = _to_uint8(frames)
    text = json.dumps(metadata or {}, ensure_ascii=False)
    suffix = path.suffix.lower()
    if suffix and suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"unknown output format {suffix!r}: use .mp4, .gif, .webp or a folder name for PNG frames")
    if not suffix:
        _write_png_folder(Path(os.path.abspath(path)), data, text)  # absolute: "." has no name to write beside
        return path
    with atomic_path(path) as tmp:
        if suffix == ".mp4":
            _write_mp4(tmp, data, fps, text)
        else:
            _write_animated_image(tmp, data, fps, text, suffix)
    return path


def _write_mp4(path: Path, data: np.ndarray, fps: float, text: str) -> None:
    import imageio.v3 as iio

    iio.imwrite(
        path,
        data,
        extension=".mp4",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
        output_params=["-metadata", f"comment={text}"],
    )


def _write_animated_image(path: Path, data: np.ndarray, fps: float, text: str, suffix: str) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in data]
    options = {"save_all": True, "append_images": images[1:], "duration": round(1000 / fps), "loop": 0}
    if suffix == ".gif":
        options["comment"] = text.encode()
    else:
        options.update(lossless=True, xmp=f"<{METADATA_KEY}>{text}</{METADATA_KEY}>".encode())
    images[0].save(path, format=suffix[1:].upper(), **options)


FRAME_NAME = re.compile(r"\d{5}\.png")  # what _write_png_folder names frame i: f"{i:05d}.png"


def is_our_frame(path: Path) -> bool:
    """Whether ``path`` is a frame this module wrote (a numbered PNG with our settings chunk)."""
    from PIL import Image

    if not (FRAME_NAME.fullmatch(path.name) and path.is_file()):
        return False
    try:
        with Image.open(path) as im:
            return METADATA_KEY in getattr(im, "text", {})
    except OSError:
        return False


def frame_conflicts(folder: Path, frames: int) -> list[Path]:
    """Files in ``folder`` that writing ``frames`` PNG frames there would replace but that we did not write."""
    names = [folder / f"{i:05d}.png" for i in range(frames)]
    return [p for p in names if p.exists() and not is_our_frame(p)]


def _write_png_folder(folder: Path, data: np.ndarray, text: str) -> None:
    """Numbered PNG frames in ``folder``: a new folder appears whole; in an existing one our earlier frames are
    replaced and everything else is left as it was."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(METADATA_KEY, text)

    def save_frames(where: Path) -> None:
        for i, frame in enumerate(data):
            Image.fromarray(frame).save(where / f"{i:05d}.png", pnginfo=info)

    if not folder.exists():
        with atomic_dir(folder) as tmp:
            save_frames(tmp)
        return
    blocking = frame_conflicts(folder, len(data))
    if blocking:
        raise ValueError(f"{folder}: will not replace {blocking[0].name}, which this program did not write")
    # Written first inside the folder (hidden; its parent may not be writable), then moved in frame by frame.
    with scratch_dir(folder / ".frames") as tmp:
        save_frames(tmp)
        for old in folder.iterdir():
            if FRAME_NAME.fullmatch(old.name) and int(old.name[:5]) >= len(data) and is_our_frame(old):
                old.unlink()  # a longer earlier video of ours: its extra frames would join this one
        for new in sorted(tmp.iterdir()):
            os.replace(new, folder / new.name)


def read_metadata(path: str | Path) -> dict:
    """The settings a writer of this module stored in ``path`` ({} if none)."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        first = sorted(path.glob("*.png"))[0]
        with Image.open(first) as im:
            return json.loads(im.text.get(METADATA_KEY, "{}"))
    if path.suffix.lower() == ".mp4":
        import subprocess

        import imageio_ffmpeg

        out = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines():
            if line.startswith("comment="):
                # ffmetadata escapes '=', ';', '#', '\\' and newlines with a backslash.
                return json.loads(re.sub(r"\\(.)", r"\1", line[len("comment=") :]))
        return {}
    from PIL import Image

    with Image.open(path) as im:
        if path.suffix.lower() == ".gif":
            return json.loads(im.info.get("comment", b"{}").decode())
        xmp = im.info.get("xmp", b"").decode()
        start, end = f"<{METADATA_KEY}>", f"</{METADATA_KEY}>"
        return json.loads(xmp[xmp.find(start) + len(start) : xmp.find(end)]) if start in xmp else {}
