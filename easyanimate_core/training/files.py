"""What a training run writes and reads back: exact-resume checkpoints, full-model shards, the loss log and plot.

Everything is safetensors or JSON (never pickle) and written atomically (``atomic.py``).

A checkpoint folder ``checkpoints/checkpoint-<step>/`` holds
    lora.safetensors or transformer/     the trained weights in float32 (a usable LoRA / model folder)
    optimizer.safetensors                the optimizer's per-parameter tensors ("state/<param>/<name>")
    training_state.json                  step, epoch, optimizer settings, grad-scaler state, run fingerprint,
                                         and each rank's Python RNG state
    rng.safetensors                      each rank's torch CPU / CUDA and NumPy RNG states ("rank<r>/...")
The folder appears under its final name only once complete, so ``latest_checkpoint`` never sees a partial one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from ..atomic import atomic_dir, atomic_path

STATE_FILE = "training_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


def write_json(path: str | Path, data) -> None:
    """``data`` as indented JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, atomically (tensors are made contiguous CPU copies)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata)


# --------------------------------------------------------------------------------------------------
# Optimizer and RNG state as tensors + JSON
# --------------------------------------------------------------------------------------------------


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as (tensors, JSON-able rest); parameters may be keyed by index or name."""
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{param}/{name}"] = value
            else:
                scalars[f"{param}/{name}"] = value
    keyed_by_index = all(isinstance(p, int) for p in state["state"])
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "index_keys": keyed_by_index}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Undo :func:`split_optimizer_state`."""
    key = int if meta["index_keys"] else str
    state: dict = {}
    for name, value in tensors.items():
        _, param, field = name.split("/")  # "state/<index or dotted name>/<field>"
        state.setdefault(key(param), {})[field] = value
    for name, value in meta["scalars"].items():
        param, field = name.rsplit("/", 1)
        state.setdefault(key(param), {})[field] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], list]:
    """This process's RNG states (torch CPU and CUDA, NumPy, Python) as tensors plus a small JSON-able rest."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    tensors["numpy_pos"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    tensors["numpy_gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    return tensors, [version, gauss_next]


def set_rng_state(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    pos, has_gauss = tensors["numpy_pos"].tolist()
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(tensors["numpy_gauss"][0])))
    version, gauss_next = python_state
    random.setstate((version, tuple(tensors["python"].tolist()), gauss_next))


# --------------------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------------------


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoint folders under ``output``, oldest first."""
    folder = output / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(output: Path, resume: str) -> Path:
    """The checkpoint folder ``--resume`` names ("latest" or a path); ValueError if there is none."""
    if resume == "latest":
        found = list_checkpoints(output)
        if not found:
            raise ValueError(f"--resume latest: no checkpoint under {output / 'checkpoints'}; start without --resume")
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE} in it)")
    return path


def write_checkpoint(
    folder: Path,
    write_weights,
    optimizer_state: dict,
    state: dict,
    rng_states: list[tuple[dict[str, torch.Tensor], list]],
) -> None:
    """Write one checkpoint folder atomically; ``write_weights(tmp_folder)`` writes the weights into it."""
    tensors, optimizer_meta = split_optimizer_state(optimizer_state)
    with atomic_dir(folder) as tmp:
        write_weights(tmp)
        save_tensors(tmp / "optimizer.safetensors", tensors)
        rng_tensors = {f"rank{r}/{k}": v for r, (t, _) in enumerate(rng_states) for k, v in t.items()}
        save_tensors(tmp / "rng.safetensors", rng_tensors)
        full_state = dict(state, optimizer=optimizer_meta, python_rng=[p for _, p in rng_states])
        write_json(tmp / STATE_FILE, full_state)  # written last: its presence marks a complete folder


def read_checkpoint(folder: Path, rank: int) -> tuple[dict, dict, tuple[dict, list] | None]:
    """(state, optimizer state dict, this rank's RNG state or None when the run had fewer ranks)."""
    state = json.loads((folder / STATE_FILE).read_text())
    optimizer = join_optimizer_state(safetensors.torch.load_file(folder / "optimizer.safetensors"), state["optimizer"])
    rng_all = safetensors.torch.load_file(folder / "rng.safetensors")
    prefix = f"rank{rank}/"
    mine = {k[len(prefix) :]: v for k, v in rng_all.items() if k.startswith(prefix)}
    rng = (mine, state["python_rng"][rank]) if mine else None
    return state, optimizer, rng


def prune_checkpoints(output: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoint folders."""
    import shutil

    if keep:
        for old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old)


# --------------------------------------------------------------------------------------------------
# Full-model shards (the official / diffusers folder layout that load_transformer reads)
# --------------------------------------------------------------------------------------------------

WEIGHTS_NAME = "diffusion_pytorch_model"


def write_transformer_folder(
    folder: Path, state_dict: dict[str, torch.Tensor], config: dict, dtype: torch.dtype, max_shard_bytes: int
) -> None:
    """``folder`` (written in place; callers wrap it in atomic_dir) with config.json and safetensors shards."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu", dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    write_json(folder / "config.json", config)
    if len(shards) == 1:
        save_tensors(folder / f"{WEIGHTS_NAME}.safetensors", shards[0], {"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{WEIGHTS_NAME}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(folder / name, shard, {"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    write_json(
        folder / f"{WEIGHTS_NAME}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


# --------------------------------------------------------------------------------------------------
# Loss log and plot
# --------------------------------------------------------------------------------------------------


class LossLog:
    """``loss.jsonl``: one JSON object per optimizer step ({"step", "loss", "lr", "epoch"})."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.entries = []
        if path.is_file():
            self.entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        # Steps after the resumed checkpoint were trained by the interrupted run: they are trained again.
        self.entries = [e for e in self.entries if resume_step is not None and e["step"] <= resume_step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in self.entries))

    def append(self, entry: dict) -> None:
        self.entries.append(entry)
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


def plot_losses(entries: list[dict], path: Path, size: tuple[int, int] = (800, 400)) -> None:
    """A PNG of the loss per step (light) and its running mean over 10 % of the steps (dark), atomically."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 70, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), "training loss", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if entries:
        steps = [e["step"] for e in entries]
        losses = [e["loss"] for e in entries]
        window = max(1, len(losses) // 10)
        mean = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-12
        first, last = steps[0], max(steps[-1], steps[0] + 1)

        def xy(step, loss):
            x = left + (step - first) / (last - first) * (width - left - right)
            return x, top + (hi - loss) / (hi - lo) * (height - top - bottom)

        for series, color in ((losses, (150, 180, 230)), (mean, (20, 50, 160))):
            points = [xy(s, v) for s, v in zip(steps, series, strict=True)]
            draw.line(points, fill=color, width=2) if len(points) > 1 else draw.point(points, fill=color)
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, height - bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, height - bottom + 6), f"step {first}", fill="black")
        draw.text((width - right - 80, height - bottom + 6), f"step {steps[-1]}", fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
