"""``easyanimate prepare SRC --out DATASET``: the options, the checks made before any work, and the run.

add_prepare_arguments(parser)     the options (defaults are the official pipeline's)
build_run(args) -> (Plan, executor, stop)   every input checked; ValueError names the flag and the fix
prepare_main(args) -> int         the command: exit code 0, 2 for bad input, 1 for an I/O error, 130 interrupted
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections import defaultdict
from pathlib import Path

from ...checks import check_number, check_output_folder, io_error_message
from .captions import PLACEHOLDER, CaptionTable, read_caption_map
from .filters import ocr_problem
from .pipeline import LocalExecutor, Plan, format_summary, natural_key, run_plan
from .records import OutputFolder, check_output
from .split import SplitSettings
from .stages import AestheticStage, CaptionStage, ConsistencyStage, DurationStage, MotionStage, SplitStage, TextStage
from .video import VIDEO_SUFFIXES

FILTERS = ("duration", "text", "motion", "consistency", "aesthetic")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``easyanimate prepare``."""
    p.add_argument("source", help="a folder of videos (searched recursively) or one video file")
    p.add_argument(
        "--out",
        required=True,
        help="output folder: clips/, records/, metadata.json (the dataset for `easyanimate train --data`); "
        "a new or empty folder, or an earlier prepare output to resume",
    )

    g = p.add_argument_group("splitting (PySceneDetect)")
    g.add_argument("--no-split", action="store_true", help="take each video whole as one clip (already clips)")
    g.add_argument("--scene-threshold", type=float, default=27.0, help="ContentDetector threshold: lower cuts more")
    g.add_argument("--min-scene-frames", type=int, default=15, help="no two cuts closer than this many frames")
    g.add_argument("--min-seconds", type=float, default=3.0, help="shorter scenes and pieces are dropped")
    g.add_argument("--max-seconds", type=float, default=10.0, help="longer scenes are cut into pieces this long")
    g.add_argument("--trim-seconds", type=float, default=0.5, help="taken off the end of a scene that ends at a cut")
    g.add_argument("--crf", type=int, default=22, help="x264 quality of the clips (lower: better, larger)")
    g.add_argument("--preset", default="veryfast", choices=X264_PRESETS, help="x264 speed preset of the clips")

    g = p.add_argument_group("filters")
    g.add_argument("--min-pixels", type=int, default=512 * 512, help="videos with fewer pixels a frame are dropped")
    g.add_argument("--min-aspect", type=float, help="videos narrower than this width/height are dropped")
    g.add_argument("--max-aspect", type=float, help="videos wider than this width/height are dropped")
    g.add_argument("--max-text-area", type=float, default=0.02, help="clips with more of the frame in text are dropped")
    g.add_argument("--text-frames", type=int, default=1, help="frames read by OCR (1: the middle one)")
    g.add_argument("--min-motion", type=float, default=2.0, help="clips with less optical flow (pixels) are dropped")
    g.add_argument("--max-motion", type=float, default=20.0, help="clips with more optical flow are dropped")
    g.add_argument("--motion-fps", type=float, default=2.0, help="frames a second compared by the motion filter")
    g.add_argument("--consistency-model", help="local CLIP / SigLIP / DINOv2 folder: drop clips holding a scene change")
    g.add_argument("--min-consistency", type=float, default=0.8, help="least similarity of neighbouring key frames")
    g.add_argument("--aesthetic-model", help="local image model folder of the aesthetic predictor (e.g. SigLIP)")
    g.add_argument("--aesthetic-head", help="its linear scoring head (.safetensors or .pth state dict)")
    g.add_argument(
        "--min-aesthetic", type=float, default=4.0, help="clips with a lower mean aesthetic score are dropped"
    )
    g.add_argument("--aesthetic-frames", type=int, default=4, help="frames scored by the aesthetic filter")
    g.add_argument(
        "--skip", nargs="+", default=[], choices=FILTERS, metavar="FILTER", help=f"filters not to run: {FILTERS}"
    )

    g = p.add_argument_group("captions")
    g.add_argument(
        "--captions",
        default="sidecar",
        help="'sidecar' (VIDEO.txt beside each video), 'none', or a .csv / .json / .jsonl map of file name -> caption",
    )
    g.add_argument("--caption-model", help="local image-text-to-text model folder: captions clips without one")
    g.add_argument("--caption-prompt", default="Describe this video in detail. Don't repeat.", help="its prompt")
    g.add_argument("--caption-frames", type=int, default=8, help="frames the caption model sees")
    g.add_argument("--caption-max-tokens", type=int, default=512, help="longest model caption, in tokens")
    g.add_argument("--caption-template", default=PLACEHOLDER, help="dataset text, e.g. 'a video of {caption}'")

    g = p.add_argument_group("running")
    g.add_argument("--workers", type=int, help="worker processes for splitting and the CPU filters (default: CPUs)")
    g.add_argument("--device", default="auto", help="device of the model filters and captions: auto, cpu, cuda, cuda:N")
    g.add_argument("--batch-size", type=int, default=16, help="clips a model filter takes at once")
    g.add_argument(
        "--ray", action="store_true", help="run the stages on a local Ray instance (pip install 'ray[data]')"
    )
    g.add_argument("--ray-address", help="run the stages on the Ray cluster at this address (implies --ray)")
    g.add_argument("--ray-model-actors", type=int, default=1, help="Ray actors per model stage (a GPU each on CUDA)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _check_numbers(args) -> None:
    """Every numeric option within its range, and the pairs in order."""
    check_number("--scene-threshold", args.scene_threshold, low=0, low_open=True)
    check_number("--min-scene-frames", args.min_scene_frames, low=1)
    check_number("--min-seconds", args.min_seconds, low=0, low_open=True)
    check_number("--max-seconds", args.max_seconds, low=args.min_seconds, fix="it must be at least --min-seconds")
    check_number("--trim-seconds", args.trim_seconds, low=0)
    check_number("--crf", args.crf, low=0, high=51)
    check_number("--min-pixels", args.min_pixels, low=0)
    check_number("--min-aspect", args.min_aspect, low=0, low_open=True)
    check_number("--max-aspect", args.max_aspect, low=args.min_aspect or 0, low_open=args.min_aspect is None)
    check_number("--max-text-area", args.max_text_area, low=0, high=1)
    check_number("--text-frames", args.text_frames, low=1)
    check_number("--min-motion", args.min_motion, low=0)
    check_number("--max-motion", args.max_motion, low=args.min_motion, fix="it must be at least --min-motion")
    check_number("--motion-fps", args.motion_fps, low=0, low_open=True)
    check_number("--min-consistency", args.min_consistency, low=-1, high=1)
    check_number("--min-aesthetic", args.min_aesthetic)
    check_number("--aesthetic-frames", args.aesthetic_frames, low=1)
    check_number("--caption-frames", args.caption_frames, low=1)
    check_number("--caption-max-tokens", args.caption_max_tokens, low=1)
    check_number("--workers", args.workers, low=1)
    check_number("--batch-size", args.batch_size, low=1)
    check_number("--ray-model-actors", args.ray_model_actors, low=1)
    if PLACEHOLDER not in args.caption_template:
        raise ValueError(
            f"--caption-template {args.caption_template!r}: must contain {PLACEHOLDER}, where each clip's caption "
            "goes (e.g. 'a video of {caption}')"
        )


def find_sources(source: Path, out: Path) -> tuple[Path, list[str]]:
    """(root folder, video paths relative to it in natural order); ValueError if there are none or two clips
    of different sources would get the same name."""
    if source.is_file():
        if source.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"SRC {source}: not a video file ({', '.join(VIDEO_SUFFIXES)}); give a video or a folder")
        return source.parent, [source.name]
    out = out.resolve()
    found = []
    for folder, subfolders, files in os.walk(source):
        # The output folder may sit inside SRC: its clips are not sources. Hidden folders and files are skipped.
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and (Path(folder) / d).resolve() != out)
        found += [Path(folder, f) for f in files if Path(f).suffix.lower() in VIDEO_SUFFIXES and not f.startswith(".")]
    if not found:
        raise ValueError(f"SRC {source}: no videos found ({', '.join(VIDEO_SUFFIXES)}, searched in subfolders too)")
    relative = sorted((p.relative_to(source).as_posix() for p in found), key=natural_key)
    by_stem = defaultdict(list)
    for rel in relative:
        by_stem[Path(rel).with_suffix("").as_posix()].append(rel)
    clashes = [names for names in by_stem.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" and ".join(names) for names in clashes[:5])
        raise ValueError(
            f"SRC {source}: videos differing only in extension would give clips of one name ({listed}); rename one"
        )
    return source, relative


def _resolve_device(device: str) -> str:
    """ "auto" -> cuda when there is a GPU, else cpu; ValueError for a CUDA device that is not there."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device {device}: give auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return device


def _caption_table(spec: str) -> CaptionTable:
    """The written captions named by --captions."""
    if spec in ("sidecar", "none"):
        return CaptionTable(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"--captions {spec}: no such file; give 'sidecar', 'none' or a .csv / .json / .jsonl map")
    return CaptionTable("map", read_caption_map(path))


def _model_stages(args, device: str) -> tuple[list, CaptionStage | None]:
    """The model filters and the caption stage the options ask for, each model folder checked."""
    from .image_models import AestheticHead, check_model_folder, embedding_size

    stages = []
    if args.consistency_model and "consistency" not in args.skip:
        folder = check_model_folder("--consistency-model", args.consistency_model)
        _check_image_processor("--consistency-model", folder)
        stages.append(ConsistencyStage(str(folder.resolve()), device, args.min_consistency, args.batch_size))
    if bool(args.aesthetic_model) != bool(args.aesthetic_head):
        raise ValueError("--aesthetic-model and --aesthetic-head go together: the image model and its scoring head")
    if args.aesthetic_model and "aesthetic" not in args.skip:
        folder = check_model_folder("--aesthetic-model", args.aesthetic_model)
        _check_image_processor("--aesthetic-model", folder)
        head_file = Path(args.aesthetic_head).expanduser()
        if not head_file.is_file():
            raise ValueError(f"--aesthetic-head {args.aesthetic_head}: no such file")
        head = AestheticHead.load(head_file)
        width = embedding_size(folder)
        if width is not None and width != head.in_features:
            raise ValueError(
                f"--aesthetic-head {head_file}: takes {head.in_features}-wide embeddings, but --aesthetic-model "
                f"{folder} gives {width}; give the head trained on that model"
            )
        stages.append(
            AestheticStage(
                str(folder.resolve()),
                str(head_file.resolve()),
                device,
                args.min_aesthetic,
                args.aesthetic_frames,
                args.batch_size,
            )
        )
    caption_stage = None
    if args.caption_model:
        folder = check_model_folder("--caption-model", args.caption_model)
        _check_caption_model(folder)
        caption_stage = CaptionStage(
            str(folder.resolve()), device, args.caption_prompt, args.caption_frames, args.caption_max_tokens
        )
    return stages, caption_stage


def _check_image_processor(flag: str, folder: Path) -> None:
    """The folder's image processor loads (no weights are read)."""
    from transformers import AutoImageProcessor

    try:
        AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError / KeyError for a missing or odd config
        raise ValueError(f"{flag} {folder}: no usable image processor config ({e})") from e


def _check_caption_model(folder: Path) -> None:
    """The folder holds an image-text-to-text model with a processor and a chat template (no weights read)."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises several kinds for a missing or odd config
        raise ValueError(f"--caption-model {folder}: cannot read its config or processor ({e})") from e
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(
            f"--caption-model {folder}: a {config.model_type!r} model, not an image-text-to-text one; give a "
            "video/image-language model folder (LLaVA, Qwen2-VL, InternVL, ...)"
        )
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"--caption-model {folder}: its processor has no chat template to put frames and prompt in")


def build_run(args) -> tuple[Plan, object, object]:
    """(plan, executor, stop) for ``args``, every input checked before anything is written."""
    _check_numbers(args)
    use_ray = args.ray or bool(args.ray_address)
    if use_ray:
        from .ray_runner import ray_problem

        problem = ray_problem()
        if problem:
            raise ValueError(f"--ray: {problem}")
    source = Path(args.source).expanduser().resolve()
    if not source.exists():
        raise ValueError(f"SRC {args.source}: no such folder or file")
    out = check_output_folder("--out", args.out).resolve()
    source_root, sources = find_sources(source, out)
    if not args.no_split and importlib.util.find_spec("scenedetect") is None:
        raise ValueError("splitting needs PySceneDetect: pip install scenedetect (or pass --no-split for clips)")
    device = _resolve_device(args.device)
    captions = _caption_table(args.captions)

    workers = args.workers or (None if use_ray else os.cpu_count() or 1)
    split_settings = SplitSettings(
        args.scene_threshold, args.min_scene_frames, args.min_seconds, args.max_seconds, args.trim_seconds,
        args.crf, args.preset,
    )  # fmt: skip
    split = SplitStage(str(out), split_settings, not args.no_split, args.min_pixels, args.min_aspect, args.max_aspect)
    stages, off = [], {}
    if "duration" not in args.skip:
        stages.append(DurationStage(args.min_seconds, args.max_seconds))
    ocr_missing = ocr_problem()
    if "text" in args.skip:
        off["text"] = "--skip text"
    elif ocr_missing:
        off["text"] = ocr_missing
        print(f"warning: the text filter is off: {ocr_missing}", file=sys.stderr)
    else:
        threads = 1 if use_ray or (workers or 1) > 1 else 0
        stages.append(TextStage(args.max_text_area, args.text_frames, threads))
    if "motion" not in args.skip:
        stages.append(MotionStage(args.min_motion, args.max_motion, args.motion_fps))
    model_stages, caption_stage = _model_stages(args, device)
    stages += model_stages
    for name, flag in (("consistency", "--consistency-model"), ("aesthetic", "--aesthetic-model")):
        if name in args.skip:
            off[name] = f"--skip {name}"
        elif not any(stage.name == name for stage in stages):
            off[name] = f"no {flag} given"
    scores = {stage.name: stage.settings() for stage in stages}
    if caption_stage is not None:
        scores["caption"] = caption_stage.settings()
    settings = {"split": split.settings(), "scores": scores}
    check_output(out, source, settings)

    folder = OutputFolder(out)
    plan = Plan(
        source_root, sources, folder, split, stages, captions, caption_stage, args.caption_template, settings, off
    )
    if use_ray:
        from .ray_runner import RayExecutor, start_ray

        stop = start_ray(args.ray_address, args.workers)
        return plan, RayExecutor(args.workers, args.ray_model_actors), stop
    return plan, LocalExecutor(workers), lambda: None


def prepare_main(args) -> int:
    """Run ``easyanimate prepare``; returns the exit code (errors are printed, not raised)."""
    try:
        plan, executor, stop = build_run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        plan.out.start(Path(args.source).expanduser().resolve(), plan.settings)
        summary = run_plan(plan, executor, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {io_error_message(e, 'then rerun the same command to continue')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"interrupted; what finished is recorded in {plan.out.root}: rerun the same command to continue",
            file=sys.stderr,
        )
        return 130
    finally:
        executor.close()
        plan.out.close()
        stop()
    print(format_summary(summary))
    return 0
