"""What each training step is made of: prompt embeddings and latents computed beforehand, the examples of a
step (loaded in DataLoader workers), random inpaint masks, and the seeded generators behind every draw.

Every draw for a sample comes from ``seeded(seed, step, position in the global batch, stream)``: a resumed
run and a run on any number of processes draw the same numbers for the same global batch.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file

from ..text_encoders import PromptEmbeds
from .dataset import load_clip
from .files import save_tensors
from .runs import Processes


class Run(Protocol):
    """What the caches and step examples read of a transformer training run (``trainer.Run``)."""

    args: argparse.Namespace  # stride, seed, cache_dir, cache_inpaint, batch_size
    procs: Processes
    root: Path
    samples: list
    buckets: list
    inpaint: bool
    vae: torch.nn.Module | None

    def progress(self, items, desc: str): ...


def seeded(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, *keys): independent streams per step and batch position."""
    hashed = hashlib.sha256(":".join(map(str, (seed, *keys))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(hashed[:8], "little") & (2**63 - 1))


def digest(*parts) -> str:
    """A short hex key of ``parts`` (cache file names, fingerprints)."""
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:32]


class TextEmbeddings:
    """Every caption's embedding (and the empty prompt's), computed once; the text encoders are freed after.

    With ``cache_dir`` each embedding is a safetensors file there (read when needed, reused by later runs);
    otherwise they are kept in memory.
    """

    FIELDS = ("embeds", "mask", "embeds_2", "mask_2")

    def __init__(self, root: Path, version: str, texts, dtype, procs: Processes, cache_dir: Path | None, log):
        self.memory: dict[str, PromptEmbeds] = {}
        self.folder = cache_dir / "text" / digest(root.resolve(), version, dtype) if cache_dir else None
        unique = sorted(set(texts) | {""})
        todo = [t for t in unique if not self.folder or not self._file(t).is_file()]
        if self.folder:
            todo = todo[procs.rank :: procs.world]  # each process encodes a share into the shared cache
        if todo:
            from ..text_encoders import load_text_encoders

            log(f"encoding {len(todo)} prompts")
            encoders = load_text_encoders(root, version.lower(), dtype=dtype, device=procs.device, cache_size=0)
            for i in range(0, len(todo), 8):
                chunk = todo[i : i + 8]
                rows = encoders.encode_texts(chunk).to("cpu")
                for j, text in enumerate(chunk):
                    self._store(text, rows.rows(j))
            del encoders
        procs.barrier()

    def _file(self, text: str) -> Path:
        return self.folder / f"{digest(text)}.safetensors"

    def _store(self, text: str, row: PromptEmbeds) -> None:
        if self.folder is None:
            self.memory[text] = row
            return
        fields = {f: getattr(row, f) for f in self.FIELDS if getattr(row, f) is not None}
        save_tensors(self._file(text), fields)

    def get(self, texts: list[str]) -> PromptEmbeds:
        """The embeddings of ``texts`` as one batch (CPU)."""
        if self.folder is None:
            return PromptEmbeds.cat([self.memory[t] for t in texts])
        return PromptEmbeds.cat([PromptEmbeds(**load_file(self._file(t))) for t in texts])


def fixed_clip_generator(seed: int, sample_index: int) -> torch.Generator:
    """The generator of a sample's one clip when latents are cached (the clip cannot change then)."""
    return seeded(seed, -1, sample_index)


def _cache_files(run: Run, kind: str, *extra) -> dict[int, Path]:
    """{sample position: file in ``cache_dir/kind``}, named by the sample's file, clip settings, model and ``extra``."""
    args = run.args
    files = {}
    for pos, (sample, bucket) in enumerate(zip(run.samples, run.buckets, strict=True)):
        stat = sample.path.stat()
        key = digest(sample.path.resolve(), stat.st_mtime_ns, stat.st_size, bucket, args.stride, args.seed, run.root)
        files[pos] = Path(args.cache_dir) / kind / f"{digest(key, *extra) if extra else key}.safetensors"
    return files


def build_latent_cache(run: Run) -> dict[int, Path]:
    """Each sample's posterior (mean, logvar) of its fixed clip, in ``cache_dir/latents``; {sample position: file}."""
    args, procs = run.args, run.procs
    files = _cache_files(run, "latents")
    todo = [pos for pos, f in files.items() if not f.is_file()][procs.rank :: procs.world]
    for pos in run.progress(todo, "caching latents"):
        sample, bucket = run.samples[pos], run.buckets[pos]
        pixels = load_clip(sample, bucket, args.stride, fixed_clip_generator(args.seed, sample.index))
        with torch.no_grad():
            mean, logvar = run.vae.encode(pixels[None].to(procs.device))
        save_tensors(files[pos], {"mean": mean[0], "logvar": logvar[0]})
    procs.barrier()
    return files


def build_inpaint_cache(run: Run) -> dict[int, Path]:
    """Each sample's ``--cache-inpaint`` inpaint inputs [1 + L, T, h, w] (mask latents ; masked-clip latents, as
    ``pipeline.inpaint_from_masked``), each from a mask and noise drawn once for the sample's fixed clip, in
    ``cache_dir/inpaint``; {sample position: file}. A step then picks one of them, so inpaint training on cached
    latents encodes nothing (otherwise every masked clip goes through the VAE at every step)."""
    from ..pipeline import encode_mean, inpaint_from_masked

    args, procs = run.args, run.procs
    count = args.cache_inpaint
    files = _cache_files(run, "inpaint", "inpaint", count)
    todo = [pos for pos, f in files.items() if not f.is_file()][procs.rank :: procs.world]
    channels = run.vae.config.latent_channels
    for pos in run.progress(todo, "caching inpaint latents"):
        sample, bucket = run.samples[pos], run.buckets[pos]
        pixels = load_clip(sample, bucket, args.stride, fixed_clip_generator(args.seed, sample.index))[None]
        scale = run.vae.config.spatial_compression
        shape = (1, channels, run.vae.latent_frames(pixels.shape[2]), *(s // scale for s in pixels.shape[3:]))
        rows = {}
        for m in range(count):
            mask, masked = draw_inpaint_input(pixels, seeded(args.seed, -2, sample.index, m))
            if masked is None:  # text-to-video draw: no kept pixels
                rows[f"inpaint{m}"] = torch.zeros(1 + channels, *shape[2:])
                continue
            with torch.no_grad():
                latents = encode_mean(run.vae, masked, procs.device).cpu()
            rows[f"inpaint{m}"] = inpaint_from_masked(run.vae, latents, mask, "cpu")[0]
        save_tensors(files[pos], rows)
    procs.barrier()
    return files


# --------------------------------------------------------------------------------------------------
# Data for one step
# --------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One sample of this process's slice of a global batch."""

    slot: int  # position in the global batch (seeds its random draws)
    text: str
    pixels: torch.Tensor | None  # [3, F, H, W] in [-1, 1] (when encoded on the fly, or for inpainting)
    moments: dict[str, torch.Tensor] | None  # cached posterior {"mean", "logvar"} [C, T, h, w]
    inpaint: torch.Tensor | None = None  # one of the sample's cached inpaint inputs [1 + C, T, h, w]


class StepExamples(torch.utils.data.Dataset):
    """Item ``step``: this process's Examples of that step's global batch (loadable in DataLoader workers)."""

    def __init__(
        self,
        run: Run,
        plan: list[list[int]],
        latent_files: dict[int, Path] | None,
        inpaint_files: dict[int, Path] | None = None,
    ):
        self.samples, self.buckets, self.plan = run.samples, run.buckets, plan
        per_rank = run.args.batch_size // run.procs.world
        self.slots = range(run.procs.rank * per_rank, (run.procs.rank + 1) * per_rank)
        self.stride, self.seed, self.latent_files = run.args.stride, run.args.seed, latent_files
        self.inpaint_files = inpaint_files
        self.need_pixels = latent_files is None or (run.inpaint and inpaint_files is None)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> list[Example]:
        out = []
        for slot in self.slots:
            pos = self.plan[step][slot]
            sample, bucket = self.samples[pos], self.buckets[pos]
            pixels = moments = None
            if self.latent_files is not None:
                moments = load_file(self.latent_files[pos])
            if self.need_pixels:
                fixed = moments is not None  # the cached latents are of one fixed clip
                g = fixed_clip_generator(self.seed, sample.index) if fixed else seeded(self.seed, step, slot, 0)
                pixels = load_clip(sample, bucket, self.stride, g)
            inpaint = None
            if self.inpaint_files is not None:
                rows = load_file(self.inpaint_files[pos])
                pick = int(torch.randint(len(rows), (), generator=seeded(self.seed, step, slot, 2)))
                inpaint = rows[f"inpaint{pick}"]
            out.append(Example(slot, sample.text, pixels, moments, inpaint))
        return out


def as_is(item):
    """The DataLoader's collate function: a step's examples are already what the step needs."""
    return item


# --------------------------------------------------------------------------------------------------
# Inpaint masks
# --------------------------------------------------------------------------------------------------

NOISE_AUG_LOG_MEAN, NOISE_AUG_LOG_STD = -3.0, 0.5  # official add_noise_to_reference_video for training


def draw_inpaint_input(pixels: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random mask for ``pixels`` [1, 3, F, H, W] and the masked, noise-augmented clip (None: nothing kept)."""
    from ..pipeline import masked_video

    mask = random_inpaint_mask(*pixels.shape[2:], g)
    sigma = math.exp(NOISE_AUG_LOG_MEAN + NOISE_AUG_LOG_STD * float(torch.randn((), generator=g)))
    return mask, masked_video(pixels, mask, g, sigma)


VIDEO_MASKS = (("all", 0.2), ("first", 0.35), ("first_last", 0.2), ("box", 0.15), ("frames", 0.1))
IMAGE_MASKS = (("all", 0.8), ("box", 0.2))


def random_inpaint_mask(frames: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """[1, 1, F, H, W], 1 = generate / 0 = keep: a subset of the official trainer's mask kinds.

    "all": text-to-video; "first": the first 1-4 frames kept (image-to-video); "first_last": as many
    kept at both ends; "box": a box over every frame generated; "frames": each frame kept or not at random.
    """
    kinds = VIDEO_MASKS if frames > 1 else IMAGE_MASKS
    kind = kinds[int(torch.multinomial(torch.tensor([p for _, p in kinds]), 1, generator=g))][0]
    mask = torch.ones(1, 1, frames, height, width)
    if kind in ("first", "first_last"):
        k = min(int(torch.randint(1, 5, (1,), generator=g)), max(1, (frames - 1) // 2))
        mask[:, :, :k] = 0
        if kind == "first_last":
            mask[:, :, -k:] = 0
    elif kind == "box":
        bh, bw = (int(torch.randint(s // 4, max(s // 4 + 1, s * 3 // 4), (1,), generator=g)) for s in (height, width))
        top = int(torch.randint(0, height - bh + 1, (1,), generator=g))
        left = int(torch.randint(0, width - bw + 1, (1,), generator=g))
        mask.zero_()
        mask[..., top : top + bh, left : left + bw] = 1
    elif kind == "frames":
        mask[:, :, torch.rand(frames, generator=g) > 0.5] = 0
    return mask
