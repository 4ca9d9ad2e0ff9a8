"""Captions of ``easyanimate prepare``: written ones (sidecar .txt files, a CSV / JSON map) and a local
video-language model.

    CaptionTable(mode, map_file)      .lookup(source_path, source_rel, clip_id) -> caption or None
    read_caption_map(path) -> {name: caption}
    apply_template(template, caption) -> text
    VideoCaptioner(folder, device, prompt, frames, max_new_tokens).caption(path, frames) -> str

A map's keys are file names or paths relative to the source folder (of a source video, or of a clip under the
output folder); the most specific match wins: clip path, clip name, source path, source name. A sidecar is the
source's own name with ``.txt`` (``walk.mp4`` -> ``walk.txt``); every clip of a source gets its caption.

The model path follows the official recaptioning (internvl2_video_recaptioning.py): 8 uniformly sampled frames,
each as an image after "Frame<i>: " in one user message, then the prompt "Describe this video in detail. Don't
repeat."; greedy decoding, at most 512 new tokens. Any transformers image-text-to-text model folder with a chat
template works (LLaVA, Qwen2-VL, InternVL-HF, ...), loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

FILE_KEYS = ("file_path", "video_path", "file_name", "file", "path", "name")
CAPTION_KEYS = ("text", "caption")
OFFICIAL_PROMPT = "Describe this video in detail. Don't repeat."
PLACEHOLDER = "{caption}"


def apply_template(template: str, caption: str) -> str:
    """``template`` with ``{caption}`` replaced (other braces are left as they are)."""
    return template.replace(PLACEHOLDER, caption.strip())


def read_caption_map(path: str | Path) -> dict[str, str]:
    """{file name or relative path: caption} from a .csv (header with a file and a caption column), a .json
    (an object, or a list of objects such as the official metadata) or a .jsonl file; ValueError naming the problem."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--captions {path}: cannot read it ({e})") from e
    try:
        if suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                return {str(k): _caption_text(path, k, v) for k, v in data.items()}
            rows = data
        else:
            raise ValueError(f"--captions {path}: give a .csv, .json or .jsonl file (or 'sidecar' / 'none')")
    except (json.JSONDecodeError, csv.Error) as e:
        raise ValueError(f"--captions {path}: not valid {suffix[1:].upper()} ({e})") from e
    if not isinstance(rows, list):
        raise ValueError(f"--captions {path}: expected an object {{file: caption}} or a list of rows")
    captions = {}
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"--captions {path}: row {number} is not an object")
        name = next((row[k] for k in FILE_KEYS if row.get(k)), None)
        caption = next((row[k] for k in CAPTION_KEYS if row.get(k) is not None), None)
        if name is None or caption is None:
            raise ValueError(
                f"--captions {path}: row {number} needs a file column ({', '.join(FILE_KEYS)}) and a caption "
                f"column ({', '.join(CAPTION_KEYS)}); it has {sorted(row)}"
            )
        captions[str(name)] = _caption_text(path, name, caption)
    return captions


def _caption_text(path: Path, name, caption) -> str:
    """A map's caption as a string; ValueError if it is not one."""
    if not isinstance(caption, str):
        raise ValueError(f"--captions {path}: the caption of {name!r} is not text: {caption!r}")
    return caption


class CaptionTable:
    """The written captions: ``mode`` "sidecar" (a .txt beside each source), "map" (``mapping``) or "none"."""

    def __init__(self, mode: str, mapping: dict[str, str] | None = None):
        self.mode, self.mapping = mode, mapping or {}

    def lookup(self, source_path: str, source_rel: str, clip_id: str) -> tuple[str, str] | None:
        """(caption, where it came from) for a clip, or None if no written caption covers it (or it is empty)."""
        if self.mode == "sidecar":
            sidecar = Path(source_path).with_suffix(".txt")
            if sidecar.is_file():
                caption = sidecar.read_text(encoding="utf-8-sig").strip()
                return (caption, "sidecar") if caption else None
            return None
        if self.mode == "map":
            for key in (clip_id, Path(clip_id).name, source_rel, Path(source_rel).name):
                caption = self.mapping.get(key, "").strip()
                if caption:
                    return caption, "map"
        return None


class VideoCaptioner:
    """A local image-text-to-text model captioning a clip from frames sampled across it."""

    def __init__(self, folder: str | Path, device: str, prompt: str = OFFICIAL_PROMPT, max_new_tokens: int = 512):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .image_models import dtype_for, dtype_kwargs

        self.torch, self.device, self.prompt, self.max_new_tokens = torch, device, prompt, max_new_tokens
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, **dtype_kwargs(dtype_for(device))
        )
        self.model = model.requires_grad_(False).eval().to(device)

    def caption(self, frames: list) -> str:
        """The model's caption of RGB frames [H, W, 3] uint8 (greedy decoding)."""
        from PIL import Image

        content = []
        for number in range(1, len(frames) + 1):
            content += [{"type": "text", "text": f"Frame{number}: "}, {"type": "image"}, {"type": "text", "text": "\n"}]
        content.append({"type": "text", "text": self.prompt})
        messages = [{"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = [Image.fromarray(frame) for frame in frames]
        inputs = self.processor(text=[prompt], images=[images], return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with self.torch.no_grad():
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = tokens[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
