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
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

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
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def write_video(path: str | Path, frames: torch.Tensor, fps: float = 8.0, metadata: dict | None = None) -> Path:
    """Write [F, H, W, 3] frames in [0, 1] to ``path`` (format from its suffix), atomically."""
    path = Path(path)
    data = _to_uint8(frames)
    text = json.dumps(metadata or {}, ensure_ascii=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix and suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"unknown output format {suffix!r}: use .mp4, .gif, .webp or a folder name for PNG frames")
    if not suffix:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            _write_png_folder(tmp, data, text)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    os.close(fd)
    try:
        if suffix == ".mp4":
            _write_mp4(Path(tmp_name), data, fps, text)
        else:
            _write_animated_image(Path(tmp_name), data, fps, text, suffix)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
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


def _write_png_folder(folder: Path, data: np.ndarray, text: str) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(METADATA_KEY, text)
    for i, frame in enumerate(data):
        Image.fromarray(frame).save(folder / f"{i:05d}.png", pnginfo=info)


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
