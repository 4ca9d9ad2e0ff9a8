"""The CPU filters of ``easyanimate prepare``: resolution / aspect, text area by OCR, motion by optical flow.

    resolution_problem(width, height, min_pixels, min_aspect, max_aspect) -> reason or None
    text_area(path, frames, sample) -> share of the frame covered by detected text (official compute_text_score.py)
    motion_score(path, fps, sample_fps) -> mean optical-flow magnitude in pixels (official compute_motion_score.py)
    ocr_problem() -> why OCR cannot run here, or None

OCR is RapidOCR on onnxruntime (``pip install rapidocr-onnxruntime``; its detection model ships inside the wheel, so
nothing is downloaded). The official pipeline runs EasyOCR's CRAFT detector; both give text boxes, and the score
is the same: the summed box area over the frame area. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .video import iter_frames, read_frames, uniform_indices

# Farneback parameters of the official compute_motion_score.py.
FARNEBACK = {
    "pyr_scale": 0.5,
    "levels": 3,
    "winsize": 15,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.2,
    "flags": 0,
}

_ocr_engines: dict[int, object] = {}  # per process: threads -> RapidOCR (loaded once, used for every clip)


def resolution_problem(
    width: int, height: int, min_pixels: int, min_aspect: float | None, max_aspect: float | None
) -> str | None:
    """Why a ``width`` x ``height`` video is dropped (the reason names the flag), or None if it is kept."""
    if width * height < min_pixels:
        return f"fewer pixels than --min-pixels {min_pixels}"
    aspect = width / height
    if min_aspect is not None and aspect < min_aspect:
        return f"width/height under --min-aspect {min_aspect:g}"
    if max_aspect is not None and aspect > max_aspect:
        return f"width/height above --max-aspect {max_aspect:g}"
    return None


def ocr_problem() -> str | None:
    """Why the text filter cannot run in this environment, or None."""
    try:
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError as e:
        return f"no OCR here ({e}); pip install rapidocr-onnxruntime"
    return None


def _ocr(threads: int):
    """This process's RapidOCR engine (detection only is used)."""
    if threads not in _ocr_engines:
        from rapidocr_onnxruntime import RapidOCR

        # Frames are detected at their own size up to 2560 px a side, like EasyOCR's default canvas in the official
        # pipeline (RapidOCR's own default enlarges every frame to 736 px on its short side: slower, finer).
        options = {"det_limit_type": "max", "det_limit_side_len": 2560}
        if threads > 0:
            options.update(intra_op_num_threads=threads, inter_op_num_threads=threads)
        _ocr_engines[threads] = RapidOCR(**options)
    return _ocr_engines[threads]


def text_area(path: str | Path, frames: int, sample: int = 1, threads: int = 0) -> float:
    """Mean share of the frame area covered by OCR text boxes over ``sample`` frames (1: the middle frame, as
    official; more: spread uniformly). ``threads`` 0 lets onnxruntime choose."""
    indices = [frames // 2] if sample == 1 else uniform_indices(frames, sample)
    shares = []
    for frame in read_frames(path, indices):  # [H, W, 3] RGB
        boxes, _ = _ocr(threads)(frame[..., ::-1], use_det=True, use_cls=False, use_rec=False)  # RapidOCR takes BGR
        area = sum(_polygon_area(np.asarray(box, np.float64)) for box in (boxes or []))
        shares.append(area / (frame.shape[0] * frame.shape[1]))
    return float(np.mean(shares))


def _polygon_area(points: np.ndarray) -> float:
    """Area of a polygon [N, 2] (the shoelace formula; a detected box is a quadrilateral)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def motion_score(path: str | Path, fps: float, frames: int, sample_fps: float = 2.0) -> float:
    """Mean Farneback optical-flow magnitude (pixels) between frames ``fps / sample_fps`` apart (official: 2 fps)."""
    import cv2

    interval = max(1, int(fps / min(max(sample_fps, 1e-6), fps)))
    interval = max(1, min(interval, frames - 1))  # a clip shorter than the interval: its first and last frames
    previous, magnitudes = None, []
    for _, frame in iter_frames(path, range(0, frames, interval)):
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)  # [H, W] uint8
        if previous is not None:
            flow = cv2.calcOpticalFlowFarneback(previous, gray, None, **FARNEBACK)  # [H, W, 2] pixels
            magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
        previous = gray
    if not magnitudes:
        raise ValueError(f"{path}: fewer than two frames to compare")
    return float(np.mean(magnitudes))
