"""``easyanimate prepare``: a folder of raw videos -> the dataset JSON ``easyanimate train`` reads.

The official EasyAnimate data pipeline (easyanimate/video_caption), one command, resumable, local or on Ray:
scene splitting with PySceneDetect (frame-exact clips of 3-10 s), filters (resolution / aspect, duration, text area
by OCR, optical-flow motion, and with a local image model scene-transition similarity and aesthetics), captions
(sidecar .txt files, a CSV / JSON map, or a local video-language model), and the metadata JSON.

    video.py         probes, frames by index, frame-exact H.264 clips
    split.py         scene detection, the official length rules, cutting
    filters.py       resolution, OCR text area, optical-flow motion (CPU)
    image_models.py  scene-transition similarity and aesthetic score (a local transformers image model)
    captions.py      written captions, the caption template, a local video-language model
    records.py       the output folder: manifest, per-stage JSON-lines records, resume checks
    stages.py        each stage: its settings, its per-item work, its verdict
    pipeline.py      the run: stages in order, results recorded as they finish, the dataset, the summary
    ray_runner.py    the same stages as Ray Data pipelines (optional: pip install "ray[data]")
    command.py       the options, the checks made before any work, the exit codes

Imports go one way: command -> pipeline, ray_runner -> stages -> split, filters, image_models, captions -> video;
pipeline also uses records and captions, captions uses image_models; nothing imports command but this file.
"""

from .command import add_prepare_arguments, prepare_main

__all__ = ["add_prepare_arguments", "prepare_main"]
