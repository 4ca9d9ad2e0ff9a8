"""Training the micro VAE on procedural clips rendered on the fly (``easyanimate train-vae``, the generic VAE trainer
in training/vae_trainer.py, trains on a dataset JSON; this one renders each batch from (seed, step) instead and
weights object pixels, and shares its chunked encode / decode with gradients).

    python -m easyanimate_core.micro.train_vae --model <model folder> --output <run folder> --steps 2000

Every batch is rendered on the fly from (seed, step): shapes of every kind, moving in every direction,
in every palette colour (the base and the extra ones: the VAE compresses pixels, it learns no words; a
first try with half the clips in random colours learned several times slower). Most steps see 32 x 32 windows
around the shape over 5 frames (cheap: the shapes are small); the last ones see whole 64 x 64 frames over
9 frames, so the per-frame GroupNorm statistics match generation. The loss is L1 + MSE on pixels
(object pixels weighted FOREGROUND_WEIGHT times: they are a few percent of each frame) plus a small KL
term; latents are sampled from the posterior, so the decoder learns to take imperfect latents.

Encoding and decoding run through the same causal chunk modes as ``MagvitVAE.encode`` / ``decode``
(frame 0 alone, then chunks with cached context), with gradients (``vae_trainer.encode_chunks`` /
``decode_chunks``). Runs resume exactly: a batch and its noise depend only on (seed, step), and
``<output>/state/`` holds weights, optimizer state and step.
``--minutes`` stops a run early at a checkpoint, to keep single runs short. ``finish`` writes the VAE
folder with ``scaling_factor`` = 1 / std of the latents of fixed clips.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_dir
from ..loading import load_vae
from ..training.files import join_optimizer_state, save_tensors, split_optimizer_state, write_json
from ..training.vae_trainer import decode_chunks, encode_chunks
from ..vae import MagvitVAE
from .data import ALL_COLOURS, all_attributes, render, sample_clip

FOREGROUND_WEIGHT = 10.0
KL_WEIGHT = 1e-5
STATE = "state"


def training_batch(
    seed: int, step: int, batch: int, frames: int, crop: int | None = None, wrap: bool = True
) -> torch.Tensor:
    """Clips [B, 3, F, H, W] in [-1, 1] for ``step``: any palette colour, shape, motion and background
    (``wrap``: the world the clips move in, ``data.Clip.wrap``).

    ``crop`` (a multiple of 16): a crop x crop window around the shape's middle position (shifted at random
    by up to a quarter window), instead of the whole 64 x 64 frame: the same pixels per shape, 4x cheaper.
    """
    rng = np.random.default_rng([seed, step])
    combinations = all_attributes(ALL_COLOURS)
    clips = []
    for _ in range(batch):
        clip = sample_clip(combinations[int(rng.integers(len(combinations)))], rng, frames=frames, wrap=wrap)
        video = render(clip)
        if crop:
            centre = np.array(clip.centre(frames // 2)) + rng.uniform(-crop / 4, crop / 4, 2)
            left, top = np.clip(np.round(centre - crop / 2).astype(int), 0, clip.size - crop)
            video = video[:, top : top + crop, left : left + crop]
        clips.append(video)
    pixels = torch.from_numpy(np.stack(clips)).float() / 127.5 - 1  # [B, F, H, W, 3]
    return pixels.permute(0, 4, 1, 2, 3).contiguous()


def posterior(vae: MagvitVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) as ``vae.encode`` computes them (frame 0, then the rest with caches), with gradients: the
    generic VAE trainer's chunked path."""
    return encode_chunks(vae, video)


def reconstruct(vae: MagvitVAE, latents: torch.Tensor) -> torch.Tensor:
    """Pixels as ``vae.decode`` computes them from unscaled latents (latent 0, then the rest), with gradients: the
    generic VAE trainer's chunked path."""
    return decode_chunks(vae, latents)


def vae_loss(vae: MagvitVAE, video: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Weighted L1 + MSE reconstruction of a posterior sample, plus KL_WEIGHT x KL; returns (loss, parts).

    The noise is drawn on the CPU from ``generator`` whatever the device, so a step's sample is the same
    on every machine.
    """
    mean, logvar = posterior(vae, video)
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    out = reconstruct(vae, mean + (0.5 * logvar).exp() * noise)
    background = video.flatten(2).median(dim=2).values[:, :, None, None, None]
    objects = ((video - background).abs().sum(1, keepdim=True) > 0.1).float()
    weight = 1 + FOREGROUND_WEIGHT * objects
    diff = out - video
    l1 = (diff.abs() * weight).mean() / weight.mean()
    mse = (diff.square() * weight).mean() / weight.mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    loss = l1 + mse + KL_WEIGHT * kl
    parts = {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
    return loss, parts


def batch_for_step(args, step: int) -> torch.Tensor:
    """The batch of ``step``: ``--crop`` windows of ``--frames`` frames, whole frames from ``--full-from`` on."""
    if args.full_from and step >= args.full_from:
        return training_batch(args.seed, step, args.full_batch, args.full_frames)
    return training_batch(args.seed, step, args.batch, args.frames, args.crop)


class _Batches(torch.utils.data.Dataset):
    """``batch_for_step(args, step)`` for steps ``start``..``args.steps``: DataLoader workers render ahead."""

    def __init__(self, args, start: int):
        self.args, self.start = args, start

    def __len__(self) -> int:
        return max(self.args.steps - self.start, 0)

    def __getitem__(self, i: int) -> torch.Tensor:
        return batch_for_step(self.args, self.start + i)


def learning_rate(args, step: int) -> float:
    """Linear warm-up to ``--lr``, then constant or (``--lr-schedule cosine``) a cosine down to a tenth."""
    warmup = min(1.0, (step + 1) / args.warmup)
    if args.lr_schedule == "constant" or step < args.warmup:
        return args.lr * warmup
    progress = min(1.0, (step - args.warmup) / max(args.steps - args.warmup, 1))
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _save_state(vae: MagvitVAE, optimizer: torch.optim.Optimizer, step: int, folder: Path, args) -> None:
    """Weights, optimizer state and step in ``folder`` (replaced whole, atomically)."""
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / "vae.safetensors", vae.state_dict())
        tensors, meta = split_optimizer_state(optimizer.state_dict())
        save_tensors(tmp / "optimizer.safetensors", tensors)
        write_json(tmp / "state.json", {"step": step, "optimizer": meta, "seed": args.seed, "batch": args.batch})


def _load_state(vae: MagvitVAE, optimizer: torch.optim.Optimizer, folder: Path, args) -> int:
    """Restore what ``_save_state`` wrote; returns the step to continue from."""
    from safetensors.torch import load_file

    saved = json.loads((folder / "state.json").read_text())
    if (saved["seed"], saved["batch"]) != (args.seed, args.batch):
        raise ValueError(
            f"{folder} was trained with --seed {saved['seed']} --batch {saved['batch']}; resume with the same"
        )
    vae.load_state_dict(load_file(folder / "vae.safetensors"))
    optimizer.load_state_dict(join_optimizer_state(load_file(folder / "optimizer.safetensors"), saved["optimizer"]))
    return int(saved["step"])


def train(args) -> int:
    """Train from ``args.model``'s vae/ (or resume ``args.output/state``) up to ``args.steps``; returns the step."""
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_vae(args.model, dtype=torch.float32).to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    step = _load_state(vae, optimizer, output / STATE, args) if (output / STATE).is_dir() else 0
    batches = torch.utils.data.DataLoader(
        _Batches(args, step), batch_size=None, num_workers=args.workers, prefetch_factor=4 if args.workers else None
    )
    started = time.monotonic()
    log = open(output / "loss.jsonl", "a", encoding="utf-8")
    progress = tqdm(total=args.steps, initial=step, desc="micro VAE", unit="step", dynamic_ncols=True)
    try:
        for video in batches:
            video = video.to(device, non_blocking=True)
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, step)
            loss, parts = vae_loss(vae, video, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log.write(json.dumps({"step": step, **parts}) + "\n")
            progress.update()
            if step % 10 == 0:
                log.flush()
                progress.set_postfix(l1=f"{parts['l1']:.4f}", kl=f"{parts['kl']:.3g}")
            out_of_time = args.minutes and time.monotonic() - started > args.minutes * 60
            if step % args.checkpoint_every == 0 or step == args.steps or out_of_time:
                _save_state(vae, optimizer, step, output / STATE, args)
            if out_of_time:
                print(f"stopped after {args.minutes} minutes at step {step}; run again to continue", flush=True)
                break
    finally:
        progress.close()
        log.close()
    return step


@torch.no_grad()
def scaling_factor(vae: MagvitVAE, clips: int = 32, seed: int = 12345, frames: int = 17) -> float:
    """1 / std of posterior samples of ``clips`` palette clips: DiT latents then have unit variance."""
    samples = []
    generator = torch.Generator().manual_seed(seed)
    for i in range(clips):
        mean, logvar = vae.encode(training_batch(seed, i, 1, frames))
        samples.append(mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator))
    return float(1.0 / torch.cat(samples).std())


def finish(model: Path, output: Path, clips: int = 32) -> Path:
    """Write ``output/vae`` (config with the scaling factor measured on ``clips`` clips, fp32) from ``output/state``."""
    from safetensors.torch import load_file

    from .model import VAE_CONFIG, save_model_folder

    vae = load_vae(model, dtype=torch.float32)
    vae.load_state_dict(load_file(output / STATE / "vae.safetensors"))
    config = {**VAE_CONFIG, "scaling_factor": round(scaling_factor(vae.eval(), clips), 5)}
    with atomic_dir(output / "vae") as tmp:
        save_model_folder(tmp, vae.state_dict(), config, torch.float32)
    return output / "vae"


@torch.no_grad()
def reconstruction_scores(vae_folder: str | Path, clips: int = 32, seed: int = 4242) -> dict:
    """Encode and decode ``clips`` held-out 17-frame clips through ``MagvitVAE.encode`` / ``decode`` (posterior
    means); returns the scorers' rates on the reconstructions and their PSNR (dB, pixels in [0, 1])."""
    from .data import held_out_attributes
    from .scoring import score, summarise

    vae = load_vae(vae_folder, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    attributes = held_out_attributes()
    rows, squared_errors = [], []
    for _ in range(clips):
        clip = sample_clip(attributes[int(rng.integers(len(attributes)))], rng)
        video = torch.from_numpy(render(clip)).float() / 127.5 - 1  # [F, H, W, 3]
        mean, _ = vae.encode(video.permute(3, 0, 1, 2)[None])
        out = ((vae.decode(mean)[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) / 2).float()
        squared_errors.append(((out - (video + 1) / 2) ** 2).mean().item())
        rows.append(score(out, clip.attributes))
    return {**summarise(rows), "psnr_db": round(float(-10 * np.log10(np.mean(squared_errors))), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m easyanimate_core.micro.train_vae", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder whose vae/ is the starting point")
    p.add_argument("--output", required=True, help="run folder (state/, loss.jsonl; vae/ after --finish)")
    p.add_argument("--steps", type=int, default=2000, help="train until this many steps in all")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=5, help="frames per training clip (4k+1)")
    p.add_argument("--crop", type=int, default=32, help="train on crop x crop windows around the shape (0: whole)")
    p.add_argument("--full-from", type=int, help="from this step on, train on whole frames (--full-*); 0: never")
    p.add_argument("--full-batch", type=int, default=2)
    p.add_argument("--full-frames", type=int, default=9)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes rendering batches ahead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--minutes", type=float, default=0, help="stop at a checkpoint after this long (0: never)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--finish", action="store_true", help="only write <output>/vae with its scaling factor")
    p.add_argument("--scores", action="store_true", help="only score reconstructions of held-out clips by <output>/vae")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if (args.frames - 1) % 4 or (args.full_frames - 1) % 4:
        p.error(f"--frames and --full-frames must be 4k+1, got {args.frames} and {args.full_frames}")
    if args.crop % 16 or args.crop > 64:
        p.error(f"--crop must be a multiple of 16 up to 64 (0: whole frames), got {args.crop}")
    if args.finish:
        print(f"wrote {finish(Path(args.model), Path(args.output))}")
        return 0
    if args.scores:
        print(json.dumps(reconstruction_scores(Path(args.output) / "vae")))
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
