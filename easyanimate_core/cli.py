"""The `easyanimate` command line.

easyanimate generate ...   a video from a model folder (text, image, video or control to video, LoRAs)
easyanimate train ...      a LoRA or a full fine-tune of the transformer (training/trainer.py)
easyanimate train-vae ...  train or fine-tune the mag VAE (training/vae_trainer.py)
easyanimate prepare ...    raw videos -> a training dataset: split, filter, caption (training/prepare/)
easyanimate info PATH      what a checkpoint is (version, variant, size, dtype, missing parts)

Every command checks all of its input before it loads a weight or touches an output (checks.py): a bad
input exits with code 2 and a message naming the flag, the value, the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .checks import (
    check_input,
    check_memory,
    check_number,
    check_output_file,
    check_output_folder,
    check_video_size,
    generation_memory_bytes,
    io_error_message,
    lora_header,
    transformer_skeleton,
)
from .loading import PIPELINE_PARTS, V3_FAMILY, inspect_checkpoint
from .offload import MEMORY_MODES, ModelPlacement
from .pipeline import CLIP_VERSIONS, RESOLUTIONS

# Frames and fps of the official predict scripts per version (V4: 144 frames at 24 fps; V1: 80 at 12).
VIDEO_DEFAULTS = {"V5.1": (49, 8.0), "V5": (49, 8.0), "V4": (144, 24.0), "V3": (144, 24.0), "V2": (144, 24.0)}
VIDEO_DEFAULTS["V1"] = (80, 12.0)


def info(path: str) -> int:
    """Print what the checkpoint at ``path`` is; a model root gets each part and what is missing."""
    root = check_input("PATH", path, "any")
    if root.is_dir() and ((root / "transformer").is_dir() or (root / "vae").is_dir()):
        version = None
        for part in ("transformer", "vae"):
            if not (root / part).is_dir():
                print(f"{part}: missing ({root / part})")
                continue
            part_info = inspect_checkpoint(root / part, kind=part)
            version = version or part_info.version
            print(part_info.summary())
        for part in PIPELINE_PARTS.get(version, []):
            print(f"{part}: {'present' if (root / part).is_dir() else 'missing'}")
        return 0
    print(inspect_checkpoint(root).summary())
    return 0


def missing_parts_message(root: Path, missing: list[str]) -> str:
    """Why ``root`` cannot generate without ``missing`` parts, and what to do: a full fine-tuning output points
    at its base model's parts (training links them; on a file system without links they must be added)."""
    import json

    listed = ", ".join(p + "/" for p in missing)
    args_file = root / "training_args.json"
    if args_file.is_file():
        base = json.loads(args_file.read_text(encoding="utf-8")).get("model", "<the base model folder>")
        links = "; ".join(f"ln -s {Path(base).expanduser().resolve() / p} {root / p}" for p in missing)
        return (
            f"{listed} missing under {root}, the output of `easyanimate train --mode full`, which trains only the "
            f"transformer: the other parts are the base model's ({base}); link or copy them in ({links})"
        )
    return f"{listed} missing under {root}; download the full model folder"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SIZE = (384, 672)  # height, width of a generation when neither the flags nor the model folder say
SIZE_DEFAULTS = {"V1": (512, 512)}  # where a version's official predict script differs (V1 at its release)


def model_root(model: str | None) -> Path:
    """The model folder of ``--model``; without one, the shipped micro model (an error says what to do when this
    install has none)."""
    if model:
        return Path(model).expanduser()
    from .micro import MICRO_MODEL, shipped_micro_model

    root = shipped_micro_model()
    if root is None:
        raise ValueError(
            f"no --model given, and the built-in micro model has no weights in this install ({MICRO_MODEL}); "
            "pass --model <model folder> (see README: models)"
        )
    return root


def read_folder_defaults(root: Path) -> dict:
    """A model folder's own generation settings (``generation_defaults.json``: width, height, frames, fps, steps,
    guidance, sampler), {} when it has none; command-line flags override them."""
    import json

    from .micro import DEFAULTS_FILE

    path = root / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        defaults = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from e
    known = {"width", "height", "frames", "fps", "steps", "guidance", "sampler"}
    if not isinstance(defaults, dict) or set(defaults) - known:
        raise ValueError(f"{path}: expected a JSON object with some of {sorted(known)}")
    return defaults


def _check_generation_numbers(args) -> None:
    """Every numeric option of ``generate`` is in range (the model's own rules for sizes come later)."""
    for flag, value in (("--frames", args.frames), ("--width", args.width), ("--height", args.height)):
        check_number(flag, value, low=1, fix="give a positive whole number")
    check_number("--steps", args.steps, low=1, fix="give at least 1 sampling step")
    check_number("--fps", args.fps, low=0, low_open=True, fix="e.g. 8 or 24")
    check_number("--guidance", args.guidance, low=0, fix="1 turns guidance off; the released default is 6")
    check_number("--strength", args.strength, low=0, high=1, low_open=True, fix="e.g. 0.7 (share of the steps)")
    check_number("--lora-strength", args.lora_strength, fix="1.0 applies each LoRA as trained")
    check_number("--shift", args.shift, low=0, low_open=True, fix="the released default is e (2.718)")
    check_number("--seed", args.seed, low=-(2**63), high=2**63 - 1, fix="a 64-bit integer")


def _output_bytes(out: Path, frames: int, height: int, width: int) -> int:
    """About the most ``write_video`` writes for a video of this size (for the free-space check)."""
    raw = frames * height * width * 3
    suffix = out.suffix.lower()
    if suffix == ".gif":
        return frames * height * width  # one palette byte a pixel
    if suffix == ".mp4":
        return raw // 10  # H.264 at its default quality stays well below a tenth of the raw frames
    return raw  # PNG frames and lossless WebP: at worst the raw pixels


def _check_output(args, frames: int, height: int, width: int) -> None:
    """``--out`` can be written, with room, and writing it loses nothing we did not write."""
    from .video_io import VIDEO_SUFFIXES, frame_conflicts

    out = Path(args.out).expanduser()
    suffix = out.suffix.lower()
    if suffix and suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"--out {args.out}: unknown format {suffix!r}; use .mp4, .gif, .webp or a folder name")
    needed = _output_bytes(out, frames, height, width)
    if suffix:
        check_output_file("--out", out, args.overwrite, needed)
        return
    check_output_folder("--out", out, needed)
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(
                f"--out {args.out}: the folder is not empty; PNG frames go into a new or empty folder "
                "(pass --overwrite to write them beside what it holds: only frames of an earlier run are replaced)"
            )
        blocking = frame_conflicts(out, frames)
        if blocking:
            raise ValueError(
                f"--out {args.out}: {blocking[0].name} is in the way and was not written by easyanimate; "
                "choose a new folder for the frames"
            )


def _check_loras(loras: list[str], info, root: Path) -> None:
    """Each ``--lora`` is a safetensors LoRA whose layers fit this transformer (from the files' headers)."""
    from .lora import read_lora

    if not loras:
        return
    skeleton = transformer_skeleton(info)
    for lora in loras:
        path = check_input("--lora", lora)
        if path.suffix != ".safetensors":
            raise ValueError(f"--lora {lora}: not a .safetensors file (LoRAs are read from safetensors only)")
        try:
            read_lora(lora_header(path), skeleton, name=f"--lora {lora}")
        except ValueError as e:
            raise ValueError(f"{e} (checked against the {info.version} model in {root})") from e


def _long_video_method(args, variant: str) -> str | None:
    """How --context-frames makes a long clip: "parts" (each part continues the last: InP models, the official
    long-video mode) or "windows" (context windows sampled together: any model, the only way for T2V / Control)."""
    if args.context_frames is None:
        return None
    can_continue = variant == "InP" and not args.video
    if args.context_method == "parts" and not can_continue:
        why = "video-to-video" if args.video else f"a {variant} model"
        raise ValueError(
            f"--context-method parts continues each part from the last one's frames, which needs an InP model "
            f"without --video; this is {why}: use --context-method windows"
        )
    if args.context_method == "auto":
        return "parts" if can_continue else "windows"
    return args.context_method


def _context_windows(args, version: str, frames: int, vae_config):
    """The context windows of --context-frames / --context-overlap (None without), checked."""
    if args.context_frames is None:
        return None
    if vae_config.temporal_mode != "mag":
        raise ValueError(
            f"--context-frames needs a V5 / V5.1 model (the mag VAE's latent frames); this {version} model makes "
            "144 frames in one pass: drop --context-frames"
        )
    from .context import context_windows_for_frames

    windows = context_windows_for_frames(args.context_frames, args.context_overlap, vae_config.temporal_compression)
    if args.context_frames >= frames:
        raise ValueError(
            f"--context-frames {args.context_frames} is not shorter than --frames {frames}: one window is the "
            "whole clip, so drop --context-frames (or raise --frames)"
        )
    return windows


def _parallel_layout(args, info, vae_config, frames: int, height: int, width: int, guidance: float):
    """The checked --ulysses-degree / --ring-degree / --cfg-parallel layout, or None for one process."""
    import os

    from .parallel import ParallelLayout, launched_by_torchrun

    for flag, value in (("--ulysses-degree", args.ulysses_degree), ("--ring-degree", args.ring_degree)):
        check_number(flag, value, low=1, fix="1 (off) or the number of processes to share the tokens")
    layout = ParallelLayout(args.ulysses_degree, args.ring_degree, 2 if args.cfg_parallel else 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if layout.world_size == 1 and world == 1:
        return None
    if not launched_by_torchrun():
        raise ValueError(
            f"--ulysses-degree / --ring-degree / --cfg-parallel run on {layout.world_size} processes: start them "
            f"with torchrun --nproc_per_node {layout.world_size} -m easyanimate_core.cli generate ..."
        )
    layout.check_world(world)
    if args.cfg_parallel and guidance <= 1.0:
        raise ValueError(f"--cfg-parallel runs the two guidance branches side by side; --guidance {guidance} has one")
    if layout.sequence > 1:
        if info.version in ("V4", *V3_FAMILY):
            raise ValueError(
                f"--ulysses-degree / --ring-degree run V5 / V5.1 models; {info.version} takes --cfg-parallel only"
            )
        one_call = args.context_frames or frames  # a context window or a part, else the whole clip
        grid = info.config.patch_size * vae_config.spatial_compression
        tokens = vae_config.latent_frames(one_call) * (height // grid) * (width // grid)
        where = f" of {'a --context-frames piece' if args.context_frames else 'the clip'} ({one_call} frames)"
        layout.check_model(info.config.num_attention_heads, tokens, where)
    return layout


def _generation_inputs(args) -> dict:
    """Read and check every input of ``generate``; raises ValueError before any weight is loaded."""
    from . import sampling
    from .text_encoders import check_text_encoder_files
    from .video_io import read_image, read_video

    _check_generation_numbers(args)
    root = model_root(args.model)
    if not root.is_dir():
        raise ValueError(f"{root}: --model must be a model folder (with transformer/, vae/, text_encoder/, ...)")
    folder_defaults = read_folder_defaults(root)
    missing = [part for part in ("transformer", "vae") if not (root / part).is_dir()]
    if missing:
        raise ValueError(missing_parts_message(root, missing))
    info = inspect_checkpoint(root / "transformer", kind="transformer")
    vae_info = inspect_checkpoint(root / "vae", kind="vae")
    check_text_encoder_files(root, info.version.lower())
    needs_clip = info.version in CLIP_VERSIONS and info.variant == "InP" and bool(args.image)
    if needs_clip:
        from .image_encoder import check_image_encoder_files

        check_image_encoder_files(root)
    _check_loras(args.lora, info, root)
    for flag in ("image", "end_image", "ref_image"):
        if getattr(args, flag):
            check_input(f"--{flag.replace('_', '-')}", getattr(args, flag), "image")
    for flag in ("video", "control"):
        if getattr(args, flag):
            check_input(f"--{flag}", getattr(args, flag), "video")

    sampler_name, steps, guidance = sampling.DEFAULTS[info.version]
    sampler_name = folder_defaults.get("sampler", sampler_name)
    steps, guidance = folder_defaults.get("steps", steps), folder_defaults.get("guidance", guidance)
    sampler_name = args.sampler or sampler_name
    steps = args.steps or steps
    strength = args.strength if args.video else 1.0
    sampler = sampling.make_sampler(sampler_name, info.version, steps, strength=strength, shift=args.shift)

    is_control = info.variant in ("Control", "Camera")
    camera_wanted = bool(args.camera or args.camera_file)
    if camera_wanted and info.variant != "Camera":
        raise ValueError(f"--camera / --camera-file need a V5.1 Control-Camera model; {root} is a {info.variant} model")
    if info.variant == "Camera" and args.control:
        raise ValueError("a Control-Camera model takes --camera or --camera-file, not --control")
    if args.camera and args.camera_file:
        raise ValueError("give --camera or --camera-file, not both")
    if (args.control or args.ref_image) and not is_control:
        raise ValueError(f"--control / --ref-image need a Control model; {root} is a {info.variant} model")
    if is_control and (args.image or args.end_image):
        raise ValueError("a Control model takes no --image / --end-image; give --control (and --ref-image)")
    if args.ref_image and info.version != "V5.1":
        raise ValueError("--ref-image needs a V5.1 Control model")
    if info.variant == "T2V" and (args.image or args.end_image):
        raise ValueError(f"{root} is a text-to-video model; --image / --end-image need an InP model")
    frames, fps = VIDEO_DEFAULTS[info.version]
    frames, fps = folder_defaults.get("frames", frames), folder_defaults.get("fps", fps)
    frames, fps = args.frames or frames, args.fps or fps
    default_size = SIZE_DEFAULTS.get(info.version, DEFAULT_SIZE)
    height = args.height or folder_defaults.get("height", default_size[0])
    width = args.width or folder_defaults.get("width", default_size[1])
    size_flags = {"frames": "--frames", "height": "--height", "width": "--width"}
    # The frame rule first: the input videos below are read up to --frames.
    valid = vae_info.config.pixel_multiple
    check_video_size(frames, valid, valid, vae_info.config, size_flags)
    camera = None
    if args.camera:
        from .camera import camera_motion, pose_entries

        check_number("--camera-speed", args.camera_speed, fix="e.g. 1.0 (the official default)")
        camera = pose_entries(camera_motion(args.camera.split("+"), args.camera_speed, frames))
    elif args.camera_file:
        from .camera import read_pose_file

        check_input("--camera-file", args.camera_file, "file")
        camera = read_pose_file(args.camera_file)
        if len(camera) < frames:
            raise ValueError(f"--camera-file has {len(camera)} poses; --frames {frames} needs at least {frames}")
    inputs = {
        "camera": camera,
        "start_image": read_image(args.image) if args.image else None,
        "end_image": read_image(args.end_image) if args.end_image else None,
        "ref_image": read_image(args.ref_image) if args.ref_image else None,
        "video": read_video(args.video, frames) if args.video else None,
        "control_video": read_video(args.control, frames) if args.control else None,
    }
    for name in ("video", "control_video"):
        clip = inputs[name]
        if clip is not None and clip.shape[0] < frames:
            raise ValueError(f"--{name.split('_')[0]} has {clip.shape[0]} frames; --frames {frames} were requested")
    if args.resolution:
        from .pipeline import size_bucket

        # The bucket follows the input's aspect ratio (start image, else input / control video), else --width/--height.
        source = next((inputs[k] for k in ("start_image", "video", "control_video") if inputs[k] is not None), None)
        aspect = (source.shape[-3], source.shape[-2]) if source is not None else (height, width)
        height, width = size_bucket(*aspect, args.resolution)
        size_flags |= {"height": "--resolution", "width": "--resolution"}
    check_video_size(frames, height, width, vae_info.config, size_flags)
    if args.trajectory:  # drawn at the final size: its points are pixels of the output video
        from .trajectory import parse_tracks, trajectory_video

        if info.variant != "Control" or args.control:
            raise ValueError("--trajectory draws the control video of a Control model: use it instead of --control")
        check_input("--trajectory", args.trajectory, "file")
        tracks = parse_tracks(json.loads(Path(args.trajectory).read_text(encoding="utf-8")))
        if len(tracks[0]) < frames:
            raise ValueError(f"--trajectory has {len(tracks[0])} points a track; --frames {frames} needs {frames}")
        inputs["control_video"] = trajectory_video(tracks, height, width)[:frames].float()
    context = _context_windows(args, info.version, frames, vae_info.config)
    long_method = _long_video_method(args, info.variant)
    # RIFLEx needs the length the model was trained on: its folder's default clip, else the version's.
    trained_frames = folder_defaults.get("frames", VIDEO_DEFAULTS[info.version][0]) if args.riflex else None
    if args.riflex and info.version in ("V4", *V3_FAMILY):
        raise ValueError(
            f"--riflex changes the temporal RoPE of V5 / V5.1 models; {info.version} has none: drop --riflex"
        )
    if args.cache is not None and info.version in V3_FAMILY:
        raise ValueError(f"--cache (the step cache) serves V4-V5.1 models; {info.version} has none: drop --cache")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hidden_size = info.config.num_attention_heads * info.config.attention_head_dim
    window_frames = args.context_frames if context else None
    cache_coefficients = None
    if args.cache is not None:
        from .step_cache import model_coefficients

        check_number("--cache", args.cache, low=0, fix="a threshold such as 0.1 (the default; higher skips more)")
        cache_coefficients = model_coefficients(root, info.version, info.config.num_layers, hidden_size)
    from .pipeline import cfg_skip_steps

    try:
        cfg_skip_steps(1, args.cfg_skip, args.cfg_skip_at)
    except ValueError as e:
        raise ValueError(f"--cfg-skip {args.cfg_skip}: {e}") from e
    needed = generation_memory_bytes(frames, height, width, vae_info.config, hidden_size, window_frames)
    check_memory(
        needed,
        f"a {frames}-frame {width}x{height} video (weights not counted)",
        device,
        "--frames / --width / --height",
    )
    _check_output(args, frames, height, width)
    guidance = args.guidance if args.guidance is not None else guidance
    layout = _parallel_layout(args, info, vae_info.config, frames, height, width, guidance)
    size = {"frames": frames, "height": height, "width": width}
    return {
        "root": root,
        "info": info,
        "sampler": sampler,
        "guidance": guidance,
        "inputs": inputs,
        "size": size,
        "fps": fps,
        "needs_clip": needs_clip,
        "device": device,
        "context": context if long_method == "windows" else None,
        "parts": (args.context_frames, args.context_overlap) if long_method == "parts" else None,
        "riflex_trained_frames": trained_frames,
        "cache_coefficients": cache_coefficients,
        "parallel": layout,
    }


def generate(args) -> int:
    """Run a generation from parsed CLI arguments and write the video."""
    from tqdm import tqdm

    from .loading import load_transformer, load_vae
    from .long_video import generate_in_parts, part_spans
    from .lora import merge_lora, read_lora
    from .pipeline import generate as run_pipeline
    from .text_encoders import load_text_encoders
    from .video_io import write_video

    job = _generation_inputs(args)
    device, groups = job["device"], None
    if job["parallel"] is not None:  # every weight is loaded on every rank: sequence parallelism splits tokens
        from .parallel import init_distributed, make_groups

        device = init_distributed(None if device.type == "cuda" else device)
        groups = make_groups(job["parallel"])
    first = groups is None or groups.is_first  # the rank that reports and writes
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    placement = ModelPlacement(args.memory_mode, device, dtype)
    root, info = job["root"], job["info"]

    text = load_text_encoders(root, info.version.lower(), dtype=dtype, device=placement.load_device)
    with placement.using("text_encoder", text):
        prompts = text.encode(args.prompt, args.negative_prompt)
    del text  # the text encoders are never needed again in this run
    image_encoder = None
    if job["needs_clip"]:  # V4 / V3 InP image-to-video: CLIP features of the start image
        from .image_encoder import load_image_encoder

        output = "image_embeds" if info.version == "V3" else "patches"
        image_encoder = load_image_encoder(root, dtype=dtype, device=placement.load_device, output=output)

    where = {"device": placement.load_device, "operations": placement.operations}
    transformer = load_transformer(root, dtype=dtype, **where)
    for lora in args.lora:  # merged before any fp8 storage, in the weights' own dtype
        merge_lora(transformer, read_lora(lora, transformer), args.lora_strength)
    transformer = placement.prepare_transformer(transformer)
    if args.compile:
        from .regional_compile import compile_blocks

        compile_blocks(transformer)  # each block compiles on its first call (the first step is slower)
    # fp16 overflows in the VAE (black frames): it computes in fp32 then, as the official tools.
    vae = load_vae(root, dtype=dtype if dtype != torch.float16 else torch.float32, **where)
    started = time.perf_counter()
    from .attention import attention_backend, using_attention
    from .step_cache import StepCache

    attention_fn, attention_name = attention_backend(args.attention)
    cache = StepCache(job["cache_coefficients"], args.cache) if args.cache is not None else None
    settings = {
        "step_cache": cache,
        "cfg_skip": args.cfg_skip,
        "cfg_skip_at": args.cfg_skip_at,
        "guidance": job["guidance"],
        "image_encoder": image_encoder,
        "seed": args.seed,
        "cfg_batched": not args.sequential_cfg,
        "device": placement.device,
        "stage": placement.using,
        "riflex_trained_frames": job["riflex_trained_frames"],
        "parallel": groups,
    }
    parts = len(part_spans(job["size"]["frames"], *job["parts"])) if job["parts"] else 1
    with (
        tqdm(total=job["sampler"].num_steps * parts, desc="sampling", unit="step", disable=not first) as bar,
        using_attention(attention_fn),
    ):
        progress = lambda done, total: bar.update(done - bar.n)  # noqa: E731
        if job["parts"]:
            part_frames, overlap = job["parts"]
            size = {k: v for k, v in job["size"].items() if k != "frames"}
            inputs = {k: v for k, v in job["inputs"].items() if v is not None}
            frames = generate_in_parts(
                transformer,
                vae,
                prompts,
                job["sampler"],
                frames=job["size"]["frames"],
                part_frames=part_frames,
                overlap=overlap,
                progress=progress,
                **size,
                **settings,
                **inputs,
            )
        else:
            frames = run_pipeline(
                transformer,
                vae,
                prompts,
                job["sampler"],
                **job["size"],
                **settings,
                progress=progress,
                context=job["context"],
                decode=first,  # the other ranks stop at the latents
                **job["inputs"],
            )
    if not first:
        torch.distributed.destroy_process_group()
        return 0
    if args.verbose:
        print(placement.describe())
    metadata = {
        "model": str(root),
        "version": info.version,
        "variant": info.variant,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "sampler": job["sampler"].name,
        "steps": job["sampler"].num_steps,
        "guidance": job["guidance"],
        "seed": args.seed,
        "frames": frames.shape[0],
        "height": frames.shape[1],
        "width": frames.shape[2],
        "fps": job["fps"],
        "dtype": args.dtype,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if args.context_frames:
        method = "parts" if job["parts"] else "windows"
        metadata["context"] = f"{method} of {args.context_frames} frames, overlap {args.context_overlap}"
    if args.riflex:
        metadata["riflex"] = f"trained on {job['riflex_trained_frames']} frames"
    metadata["attention"] = attention_name
    if cache is not None:
        metadata["step_cache"] = (
            f"threshold {args.cache}, {cache.passes} of {cache.passes + cache.skips} block passes run"
        )
        print(f"step cache: {cache.passes} of {cache.passes + cache.skips} block passes run ({cache.pass_share:.0%})")
    if args.cfg_skip:
        metadata["cfg_skip"] = f"{args.cfg_skip} at the {args.cfg_skip_at}"
    if args.compile:
        metadata["compile"] = "blocks"
    for name in (
        "image",
        "end_image",
        "video",
        "strength",
        "control",
        "ref_image",
        "camera",
        "camera_file",
        "trajectory",
    ):
        if getattr(args, name, None) and (name != "strength" or args.video):
            metadata[name] = str(getattr(args, name))
    if args.lora:
        metadata["lora"] = ", ".join(f"{Path(lora).name}:{args.lora_strength}" for lora in args.lora)
    if groups is not None:
        metadata["parallel"] = groups.layout.describe()
    out = write_video(args.out, frames, fps=job["fps"], metadata=metadata)
    print(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]})")
    if groups is not None:
        torch.distributed.destroy_process_group()
    return 0


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder (official or diffusers layout); default: the built-in micro model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--lora", action="append", default=[], help="LoRA .safetensors merged into the transformer (repeat)")
    p.add_argument("--lora-strength", type=float, default=1.0, help="strength of each --lora")
    p.add_argument("--image", help="start image (InP models; V4 and V3 also need the model's image_encoder/)")
    p.add_argument("--end-image", help="end image (InP models)")
    p.add_argument("--video", help="input video for video-to-video")
    p.add_argument("--strength", type=float, default=0.7, help="video-to-video: share of the steps to run")
    p.add_argument("--control", help="control video (canny, depth, pose, ...) for Control models")
    p.add_argument("--ref-image", help="reference image for V5.1 Control (and Control-Camera) models")
    p.add_argument(
        "--camera",
        help="camera motion for V5.1 Control-Camera models: presets joined with + that move together, e.g. "
        "pan_left+zoom_in (static, pan_up, pan_down, pan_left, pan_right, zoom_in, zoom_out, acw, cw)",
    )
    p.add_argument("--camera-speed", type=float, default=1.0, help="how far --camera moves over the clip")
    p.add_argument(
        "--trajectory",
        help='V5.1 Control models: a JSON file of points to follow, one {"x": .., "y": ..} (output pixels) a '
        "frame, or a list of such tracks; drawn as the control video (EasyAnimate's trajectory control)",
    )
    p.add_argument("--camera-file", help="camera poses in the official (CameraCtrl) text format, one row a frame")
    p.add_argument(
        "--frames",
        type=int,
        help="default: the version's (49 for V5 / V5.1, 144 for V4 / V3 / V2, 80 for V1; the VAE sets the rule: "
        "4k+1 for V5 / V5.1, 8k for V4 and V3, 9k for V2, any for V1)",
    )
    p.add_argument("--width", type=int, help="default: the model folder's, else 672 (V1: 512)")
    p.add_argument("--height", type=int, help="default: the model folder's, else 384 (V1: 512)")
    p.add_argument(
        "--resolution",
        type=int,
        choices=RESOLUTIONS,
        help="pick width x height from the official size buckets at this base resolution, in the aspect ratio "
        "of --image / --video / --control (else of --width x --height); default: none, --width x --height as given",
    )
    p.add_argument(
        "--context-frames",
        type=int,
        help="sample a long clip in overlapping windows of this many frames (4k + 1; V5 / V5.1), blended where "
        "they overlap. In latent frames (frame 0 alone, then 4 frames each): --frames 145 is 37 latent frames, "
        "--context-frames 49 is 13 and --context-overlap 16 is 4, so windows start at latent frames 0, 9, 18, 24",
    )
    p.add_argument(
        "--context-overlap", type=int, default=16, help="frames shared by neighbouring windows (a multiple of 4)"
    )
    p.add_argument(
        "--context-method",
        choices=("auto", "parts", "windows"),
        default="auto",
        help="parts: one window after the other, each continuing the last one's final --context-overlap frames, "
        "cross-faded (EasyAnimate's long-video mode; InP models); windows: all windows denoised together, their "
        "predictions blended at every step (any model); auto: parts for InP models, else windows",
    )
    p.add_argument(
        "--riflex",
        action="store_true",
        help="RIFLEx: lower the temporal RoPE frequency whose period is nearest the trained length, so one pass "
        "(or one window) a little longer than the model was trained on does not repeat its motion (V5 / V5.1)",
    )
    p.add_argument("--fps", type=float, help="default: the version's (8 for V5 / V5.1, 24 for V4 / V3 / V2, 12 for V1)")
    p.add_argument("--steps", type=int, help="default: the version's released default")
    p.add_argument("--guidance", type=float, help="default: the version's released default")
    p.add_argument(
        "--sampler",
        help="default: the version's released default (Flow for V5.1, DDIM for V5, Euler for V4, DPM++ for V1-V3)",
    )
    p.add_argument("--shift", type=float, help="V5.1 Flow time shift (default e, as released)")
    p.add_argument("--seed", type=int, default=43)
    p.add_argument(
        "--memory-mode",
        choices=MEMORY_MODES,
        default="model_cpu_offload",
        help="full: all on the GPU; model_cpu_offload: each model on the GPU only while it runs; "
        "model_cpu_offload_and_qfloat8: also store the transformer blocks in fp8; "
        "sequential_cpu_offload: stream each layer's weights (least memory, slowest)",
    )
    p.add_argument(
        "--cache",
        type=float,
        nargs="?",
        const=0.1,
        help="step caching (TeaCache): skip the transformer blocks at steps whose input changed little, reusing "
        "their last residual; the value is the threshold (alone: 0.1; higher is faster and less exact). Needs the "
        "model's polynomial: published for V5.1-12B / 7B and V5-7B, else fitted by bench/fit_step_cache.py",
    )
    p.add_argument(
        "--cfg-skip",
        type=float,
        default=0.0,
        help="share of the steps (at --cfg-skip-at) run without the unconditional branch: e.g. 0.2 saves 10%% of "
        "the model passes",
    )
    p.add_argument("--cfg-skip-at", choices=("end", "start"), default="end", help="where --cfg-skip skips")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (first step slower)")
    p.add_argument(
        "--attention",
        choices=("sdpa", "sage", "flash"),
        default="sdpa",
        help="attention kernel: PyTorch's sdpa, SageAttention or flash-attn (CUDA; when not installed: sdpa, with a "
        "warning)",
    )
    p.add_argument(
        "--ulysses-degree",
        type=int,
        default=1,
        help="sequence parallel under torchrun: processes sharing each attention's heads (all-to-all); must divide "
        "the heads (48 for V5 / V5.1) and, times --ring-degree, the video tokens",
    )
    p.add_argument(
        "--ring-degree",
        type=int,
        default=1,
        help="sequence parallel under torchrun: processes passing keys and values round a ring (when the heads "
        "do not divide further)",
    )
    p.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="under torchrun: the two guidance branches on their own processes (doubles the process count: "
        "torchrun --nproc_per_node = 2 x ulysses x ring)",
    )
    p.add_argument("--verbose", action="store_true", help="print which models were on the device at each stage")
    p.add_argument("--sequential-cfg", action="store_true", help="run the unconditional pass separately")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument(
        "--out",
        required=True,
        help="output .mp4 / .gif / .webp, or a folder for PNG frames (a new or empty one unless --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out file; for a frames folder, write beside what it holds (only frames an "
        "earlier easyanimate run wrote there are replaced)",
    )


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every default: argparse's "(default: X)", "(default: none)" for an optional input left
    out, nothing for off switches or where the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is False or action.required or "default" in text:
            return text
        if action.default is None:
            return f"{text} (default: none)" if action.option_strings else text
        return super()._get_help_string(action)


def quantize(args) -> int:
    """Write the transformer at ``args.model`` as a GGUF file in ``args.type``; checks before any weight is read."""
    from dataclasses import asdict

    from .atomic import atomic_path
    from .loading import load_transformer
    from .quant.gguf_file import write_gguf

    out = Path(args.out)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: the output of quantize is a .gguf file; name it <something>.gguf")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it, or choose another name")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent}: no such folder for the output")
    info = inspect_checkpoint(args.model, "transformer")
    transformer = load_transformer(args.model, dtype=torch.float32)
    metadata = {"config": asdict(info.config), "version": info.version, "variant": info.variant, "type": args.type}
    with atomic_path(out) as tmp:
        counts = write_gguf(Path(tmp), transformer.state_dict(), args.type, metadata)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB): " + ", ".join(f"{n} tensors {k}" for k, n in sorted(counts.items())))
    return 0


def assemble_v1_command(args) -> int:
    """Write a V1 model folder from PixArt's folder and the motion module (easyanimate_core.assemble_v1)."""
    from tqdm import tqdm

    from .assemble_v1 import assemble_v1

    with tqdm(total=1, desc="assembling", unit="part") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out = assemble_v1(args.base, args.motion_module, args.out, progress)
    print(f"wrote {out}: an EasyAnimate V1 model folder (easyanimate info {out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (``--help`` of each shows all defaults)."""
    parser = argparse.ArgumentParser(prog="easyanimate", description="EasyAnimate video models on plain PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    formatter = {"formatter_class": DefaultsHelpFormatter}
    _add_generate_arguments(commands.add_parser("generate", help="generate a video", **formatter))
    p_info = commands.add_parser("info", help="describe a checkpoint (folder or .safetensors file)", **formatter)
    p_info.add_argument("path", help="a model folder, a part of one (transformer/, vae/) or a .safetensors file")
    p_quant = commands.add_parser(
        "quantize",
        help="write a transformer as a GGUF file (Q8_0, Q5_K, Q4_K or F16; needs: pip install gguf)",
        **formatter,
    )
    p_quant.add_argument("model", help="a model folder, its transformer/ or a transformer .safetensors file")
    p_quant.add_argument("out", help="the .gguf file to write")
    p_quant.add_argument(
        "--type",
        default="Q8_0",
        choices=("Q8_0", "Q5_K", "Q4_K", "F16"),
        help="block format of the Linear weights (the rest stays F32)",
    )
    p_quant.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p_v1 = commands.add_parser(
        "assemble-v1",
        help="make an EasyAnimate V1 model folder from PixArt-alpha's folder and the V1 motion-module file",
        **formatter,
    )
    p_v1.add_argument("--base", required=True, help="PixArt-XL-2-512x512's model folder (transformer/, vae/, ...)")
    p_v1.add_argument("--motion-module", required=True, help="the release's easyanimate_v1_mm.safetensors")
    p_v1.add_argument("--out", required=True, help="the new V1 model folder (must not exist)")
    from .training.trainer import add_train_arguments

    add_train_arguments(commands.add_parser("train", help="train a LoRA or fine-tune the transformer", **formatter))
    from .training.prepare.command import add_prepare_arguments
    from .training.vae_trainer import add_train_vae_arguments

    add_train_vae_arguments(commands.add_parser("train-vae", help="train or fine-tune the mag video VAE", **formatter))
    add_prepare_arguments(
        commands.add_parser("prepare", help="split, filter and caption raw videos into a training dataset", **formatter)
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given, for the resume command training prints when stopped
    try:
        if args.command == "info":
            return info(args.path)
        if args.command == "train":
            from .training.trainer import train_main

            return train_main(args)
        if args.command == "quantize":
            return quantize(args)
        if args.command == "assemble-v1":
            return assemble_v1_command(args)
        if args.command == "train-vae":
            from .training.vae_trainer import train_vae_main

            return train_vae_main(args)
        if args.command == "prepare":
            from .training.prepare.command import prepare_main

            return prepare_main(args)
        return generate(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {io_error_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
