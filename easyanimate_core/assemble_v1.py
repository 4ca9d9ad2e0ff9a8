"""Assemble an EasyAnimate V1 model folder from its release: PixArt-alpha's base folder plus the motion module file.

V1 was released as ``easyanimate_v1_mm.safetensors``, the motion modules alone. The official predict script (at
1a1720c) builds ``Transformer3DModel.from_pretrained_2d`` from PixArt-XL-2-512x512's ``transformer/`` with the V1
yaml's motion settings (config/easyanimate_video_motion_module_v1.yaml) and loads the file on top non-strictly; the
VAE, T5 and tokenizer are PixArt's. This writes the same model as one folder every loader here reads:

    easyanimate assemble-v1 --base PixArt-XL-2-512x512 --motion-module easyanimate_v1_mm.safetensors --out V1

``transformer/`` gets PixArt's weights plus the motion modules in one safetensors file (any frame-position table
the file omits is the deterministic one the official module builds) and a config.json with the V1 motion keys;
``vae/``, ``text_encoder/``, ``tokenizer/`` (and ``scheduler/``) are hard links to the base's files (copies where
the file system has none). Every check runs on the files' headers before a weight is read; the folder is built
under a temporary name and renamed into place, and ``--out`` must not exist.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .loading import resolve_files
from .transformer_v3 import EasyAnimateV3Transformer3D, config_from_state_dict

# transformer_additional_kwargs of config/easyanimate_video_motion_module_v1.yaml (the V1 release).
V1_MOTION_CONFIG = {
    "basic_block_type": "motionmodule",
    "motion_module_type": "VanillaGrid",
    "enable_uvit": False,
    "motion_module_kwargs": {
        "num_attention_heads": 8,
        "num_transformer_block": 1,
        "attention_block_types": ["Temporal_Self", "Temporal_Self"],
        "temporal_position_encoding": True,
        "temporal_position_encoding_max_len": 4096,
        "temporal_attention_dim_div": 1,
        "block_size": 2,
    },
}
LINKED_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
NEEDED_PARTS = ("vae", "text_encoder", "tokenizer")
MOTION = ".attn_temporal."


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of safetensors files, from their headers."""
    shapes = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return shapes


def plan_v1(base: str | Path, motion_module: str | Path, out: str | Path) -> dict:
    """Check everything an assembly needs (headers only) and return what to write; ValueError naming the flag."""
    base, motion_module, out = Path(base).expanduser(), Path(motion_module).expanduser(), Path(out).expanduser()
    if out.exists():
        raise ValueError(f"--out {out} exists: name a new folder (assemble-v1 never writes into an existing one)")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out {out}: its parent folder does not exist or is not writable")
    if not base.is_dir() or not (base / "transformer").is_dir():
        raise ValueError(f"--base {base}: expected PixArt-alpha's model folder (with transformer/, vae/, ...)")
    missing = [p for p in NEEDED_PARTS if not (base / p).is_dir()]
    if missing:
        raise ValueError(f"--base {base}: {', '.join(p + '/' for p in missing)} missing; download the whole folder")
    if motion_module.suffix != ".safetensors" or not motion_module.is_file():
        raise ValueError(f"--motion-module {motion_module}: expected the release's .safetensors motion module file")
    files, base_config = resolve_files(base, "transformer")
    base_shapes = _shapes(files)
    if any(MOTION in k for k in base_shapes):
        raise ValueError(f"--base {base}: its transformer already has motion modules; load it directly")
    if "pos_embed.proj.weight" not in base_shapes or "adaln_single.linear.weight" not in base_shapes:
        raise ValueError(f"--base {base}: transformer/ is not a PixArt-alpha transformer (no pos_embed / adaln_single)")
    motion_shapes = _shapes([motion_module])
    stray = sorted(k for k in motion_shapes if MOTION not in k)
    if stray:
        raise ValueError(
            f"--motion-module {motion_module}: {len(stray)} tensor(s) outside the motion modules (e.g. {stray[0]}); "
            "give the motion-module file of the release"
        )
    config = {**base_config, **V1_MOTION_CONFIG}
    cfg = config_from_state_dict({**base_shapes, **motion_shapes}, config)
    # The yaml turns the frame positions on; the tensors may not show them (a file without its frame tables).
    cfg = cfg.replace(temporal_position_encoding=V1_MOTION_CONFIG["motion_module_kwargs"]["temporal_position_encoding"])
    with torch.device("meta"):
        model = EasyAnimateV3Transformer3D(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {**base_shapes, **motion_shapes}
    wrong = sorted(k for k in given if k in expected and given[k] != expected[k])
    unknown = sorted(set(given) - set(expected))
    absent = sorted(k for k in set(expected) - set(given) if model.derived_tensor(k) is None)
    for what, keys in (("have other shapes than", wrong), ("are not in", unknown), ("are missing from", absent)):
        if keys:
            raise ValueError(
                f"--motion-module {motion_module} with --base {base}: {len(keys)} tensor(s) {what} the V1 model "
                f"(e.g. {keys[0]}); the V1 motion module goes on PixArt-XL-2-512x512"
            )
    # The frame-position tables: released files store them (the official buffer is persistent), and detection reads
    # their presence as "temporal positions on"; a motion-module file without them gets the deterministic ones.
    tables = {name for name, _ in model.named_buffers() if name.endswith(".pos_encoder.pe")}
    derived = sorted((set(expected) | tables) - set(given))
    return {"base": base, "files": files, "motion_module": motion_module, "out": out, "config": config,
            "model": model, "derived": derived}  # fmt: skip


def _link_tree(source: Path, target: Path) -> None:
    """``source`` recreated at ``target`` from hard links (copies where the file system cannot link)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def assemble_v1(
    base: str | Path, motion_module: str | Path, out: str | Path, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write the V1 model folder ``out`` (see the module docstring); returns it."""
    plan = plan_v1(base, motion_module, out)
    out = plan["out"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        sources = [*plan["files"], plan["motion_module"]]
        for i, f in enumerate(sources):
            with safe_open(f, framework="pt") as fh:
                tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
            if progress:
                progress(i + 1, len(sources) + 1)
        dtype = tensors["pos_embed.proj.weight"].dtype
        for key in plan["derived"]:  # the frame-position tables a file may omit: deterministic
            tensors[key] = plan["model"].derived_tensor(key).to(dtype)
        (tmp / "transformer").mkdir()
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, tmp / "transformer" / "diffusion_pytorch_model.safetensors"
        )
        (tmp / "transformer" / "config.json").write_text(json.dumps(plan["config"], indent=2) + "\n")
        del tensors
        for part in LINKED_PARTS:
            if (plan["base"] / part).is_dir():
                _link_tree(plan["base"] / part, tmp / part)
        if progress:
            progress(len(sources) + 1, len(sources) + 1)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
