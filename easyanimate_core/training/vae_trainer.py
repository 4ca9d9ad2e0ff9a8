"""`easyanimate train-vae`: train the mag VAE (V5 / V5.1, any width) anew or fine-tune it; resumable, distributed.

    add_train_vae_arguments(parser)        the command's options
    train_vae_main(args) -> exit code      the command (errors printed, Ctrl-C reported with the resume hint)
    run_vae_training(args, on_step=None)   the run; ``on_step(step, loss)`` is called after every optimizer step
    python -m easyanimate_core.training.vae_trainer ...   the same command before the CLI wires it

One step (the official easyanimate/vae trainer, mag-v2 settings; losses in vae_losses.py):
* each clip of the global batch: ``--frames`` frames at ``--stride`` from a random start (images: one frame),
  a random square crop of 0.25-1 x the shorter side, resized to ``--size`` (official CustomSRTrain);
* it is encoded, a latent drawn from the posterior, decoded, and the VAE takes an AdamW step on
  reconstruction (L1 + 0.1 L2 [+ perceptual]) + 1e-6 KL + 1e5 outlier penalty [+ adaptive x adversarial];
* from ``--disc-start`` the discriminators (frame PatchGAN + clip 3-D) take their own AdamW step on the hinge
  loss of the clips against the same step's reconstructions (detached).

Temporal chunks: encoding and decoding run the model's causal chunks with gradients, as ``MagvitVAE.encode`` /
``decode`` do (frame 0 alone, then ``--chunk-frames`` frames; latent 0 alone, then ``--chunk-latents``
latents), each convolution carrying its cached past frames into the next chunk, so the training graph is the
inference graph and a chunk's working memory, not the clip's, bounds each convolution. The backward pass still
needs every chunk's activations; ``--gradient-checkpointing`` keeps only each chunk's input and caches and
recomputes one chunk at a time in the backward pass, so long clips fit: the same gradients, one more forward pass
(measured on the micro VAE's width, 25 frames at 128 x 128 on a CPU: peak memory 2.9 -> 1.2 GiB, time +13 %).

Reproducibility: every draw for a sample (clip start, crop, posterior noise) comes from a generator seeded by
(seed, step, position in the global batch), and the initial weights (random VAE, discriminators) from the seed.
A resumed run and a run on any number of processes therefore train alike; the exception is the adversarial
phase on several processes: the PatchGAN's BatchNorm normalises each process's batch (as the official).

Where it differs from the official trainer (PyTorch Lightning, two optimizers): the discriminators learn from the
reconstructions of the VAE's own forward pass (Lightning runs the VAE again for their step); before
``--disc-start`` they are left alone (the official steps them on a zero loss, so only weight decay moves them);
the perceptual term compares a local image model's features (LPIPS's weights are not shipped) and is off unless
``--perceptual-model`` is given; the NLL's learnable log-variance, in no official optimizer, is left out.

Distributed: ``torchrun`` or ``accelerate launch``; each process takes its slice of every global batch, DDP
averages the gradients, the adaptive weight's two gradients are summed over the processes (so it is the one
process value), and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_dir
from ..checks import check_input, check_number, check_output_folder, check_video_size
from ..vae import CausalTime, ChunkMode, MagvitVAE, VAEConfig
from .dataset import PROBE_CACHE, Bucket, ProbeCache, clip_indices, load_dataset, resize_crop, step_plan
from .examples import as_is, digest, seeded
from .files import (
    LossLog,
    checkpoint_dir,
    list_checkpoints,
    plot_losses,
    prune_checkpoints,
    resolve_resume,
    rng_state,
    save_tensors,
    set_rng_state,
    write_checkpoint,
    write_transformer_folder,
)
from .runs import (
    LR_SCHEDULES,
    Processes,
    StopSignals,
    TrainingInterrupted,
    TrainingStopped,
    exit_code,
    lr_factor,
    refuse_earlier_outputs,
    resume_command,
    run_in_processes,
    start_run,
    unlaunched_processes,
)
from .vae_losses import (
    DISCRIMINATOR_KINDS,
    GROUP_NORM_GROUPS,
    Discriminators,
    PerceptualDistance,
    adaptive_weight,
    check_perceptual_model,
    frame_logits_side,
    generator_loss,
    hinge_discriminator_loss,
    kl_per_sample,
    outlier_penalty_per_sample,
    reconstruction_per_sample,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VAE_FOLDER = "vae"
DISCRIMINATOR_FILE = "discriminator.safetensors"
WHOLE_FILE = 2**62  # write_transformer_folder's shard limit: a VAE is one file
# Fingerprint entries a resumed run must share with its checkpoint (they decide what is trained on and how).
STRICT_KEYS = ("vae", "config", "data", "samples", "batch_size", "seed", "size", "frames", "stride", "crop")
STRICT_KEYS += ("discriminator", "disc_channels", "disc_layers")


# --------------------------------------------------------------------------------------------------
# Encoding and decoding in temporal chunks, with gradients
# --------------------------------------------------------------------------------------------------


def cached_convs(module: nn.Module) -> list[CausalTime]:
    """The causal convolutions under ``module`` (each carries its last input frames from chunk to chunk)."""
    return [m for m in module.modules() if isinstance(m, CausalTime)]


def run_chunk(
    step: Callable[[torch.Tensor, ChunkMode], torch.Tensor],
    x: torch.Tensor,
    mode: ChunkMode,
    convs: list[CausalTime],
    checkpointed: bool,
) -> torch.Tensor:
    """``step(x, mode)``, which reads and refreshes the caches of ``convs``; ``checkpointed``: keep only its input
    and caches for the backward pass and recompute it there (the caches go in and out as tensors, so the
    recomputation sees the caches this chunk saw)."""
    if not checkpointed or not torch.is_grad_enabled():
        return step(x, mode)
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    counts_in = [len(c.cache) for c in convs]
    counts_out: list[int] = []

    def set_caches(counts: list[int], tensors) -> None:
        it = iter(tensors)
        for conv, n in zip(convs, counts, strict=True):
            conv.cache = tuple(next(it) for _ in range(n))

    def body(x: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        set_caches(counts_in, caches)
        out = step(x, mode)
        counts_out[:] = [len(c.cache) for c in convs]
        refreshed = tuple(t for c in convs for t in c.cache)
        set_caches([0] * len(convs), ())  # the recomputation in the backward pass leaves no state behind
        return (out, *refreshed)

    # Recomputed to the end (no early stop), so that ``body`` always clears the caches it set.
    with set_checkpoint_early_stop(False):
        out, *caches = checkpoint(body, x, *(t for c in convs for t in c.cache), use_reentrant=False)
    set_caches(counts_out, caches)  # the next chunk continues from the checkpoint's outputs (in the graph)
    return out


def encode_chunks(
    vae: MagvitVAE, video: torch.Tensor, chunk_frames: int | None = None, checkpointed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) [B, L, T, h, w] of ``video`` [B, 3, F, H, W] as ``MagvitVAE.encode`` computes them (frame 0
    alone, then ``chunk_frames`` at a time, default the model's), with gradients."""
    chunk = vae.chunk_length(
        chunk_frames, vae.config.mini_batch_encoder, "chunk_frames", vae.config.temporal_compression
    )
    convs = cached_convs(vae.encoder)

    def step(x, mode):
        return vae.quant_conv(vae.encoder(x, mode))

    vae.clear_caches()
    try:
        parts = [
            run_chunk(step, video[:, :, start:end], mode, convs, checkpointed)
            for start, end, mode in vae.encode_plan(video.shape[2], chunk)
        ]
    finally:
        vae.clear_caches()
    mean, logvar = torch.cat(parts, dim=2).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def decode_chunks(
    vae: MagvitVAE, latents: torch.Tensor, chunk_latents: int | None = None, checkpointed: bool = False
) -> torch.Tensor:
    """Pixels [B, 3, F, H, W] of unscaled ``latents`` [B, L, T, h, w] as ``MagvitVAE.decode`` computes them (latent
    0 alone, then ``chunk_latents`` at a time, default the model's), with gradients."""
    chunk = vae.chunk_length(chunk_latents, vae.config.mini_batch_decoder, "chunk_latents", 1)
    convs = cached_convs(vae.decoder)

    def step(z, mode):
        return vae.decoder(vae.post_quant_conv(z), mode)

    vae.clear_caches()
    try:
        parts = [
            run_chunk(step, latents[:, :, start:end], mode, convs, checkpointed)
            for start, end, mode in vae.decode_plan(latents.shape[2], chunk)
        ]
    finally:
        vae.clear_caches()
    return torch.cat(parts, dim=2)


class Autoencoding(nn.Module):
    """The VAE as one module for DDP: ``forward(video, noise)`` -> (reconstruction, mean, logvar), the latent drawn
    from the posterior with ``noise`` (so the draw is the caller's, the same on any number of processes)."""

    def __init__(self, vae: MagvitVAE, chunk_frames: int | None, chunk_latents: int | None, checkpointed: bool):
        super().__init__()
        self.vae = vae
        self.chunk_frames, self.chunk_latents, self.checkpointed = chunk_frames, chunk_latents, checkpointed

    def forward(self, video: torch.Tensor, noise: torch.Tensor):
        mean, logvar = encode_chunks(self.vae, video, self.chunk_frames, self.checkpointed)
        latents = mean + (0.5 * logvar).exp() * noise.to(mean.dtype)
        return decode_chunks(self.vae, latents, self.chunk_latents, self.checkpointed), mean, logvar


# --------------------------------------------------------------------------------------------------
# Clips
# --------------------------------------------------------------------------------------------------


def crop_resize(frames: torch.Tensor, size: int, crop: tuple[float, float], g: torch.Generator | None) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] -> [3, F, size, size] in [-1, 1]: a square of crop[0]..crop[1] x the shorter side
    at a random place (``g`` None: the whole shorter side, centred), resized to ``size``."""
    h, w = frames.shape[1:3]
    if g is None:
        side, top, left = min(h, w), (h - min(h, w)) // 2, (w - min(h, w)) // 2
    else:
        factor = crop[0] + (crop[1] - crop[0]) * float(torch.rand((), generator=g))
        side = max(1, int(min(h, w) * factor))
        top = int(torch.randint(0, h - side + 1, (), generator=g))
        left = int(torch.randint(0, w - side + 1, (), generator=g))
    return resize_crop(frames[:, top : top + side, left : left + side], size, size)


def read_clip(sample, frames: int, stride: int, g: torch.Generator) -> torch.Tensor:
    """The sample's frames [F, H, W, 3] in [0, 1]: ``frames`` at ``stride`` from a random start (shorter videos
    spread the frames over what they have, repeating some, as the official), or the image."""
    from ..video_io import read_image, read_video

    if sample.kind == "image":
        return read_image(sample.path)[None]
    indices = clip_indices(sample.frames, frames, stride, g)
    video = read_video(sample.path, max_frames=indices[-1] + 1)
    if video.shape[0] <= indices[-1]:
        raise ValueError(f"{sample.path}: decoded {video.shape[0]} frames, expected {sample.frames} (#{sample.index})")
    return video[indices]


def latent_shape(config: VAEConfig, frames: int, size: int) -> tuple[int, int, int, int]:
    """[L, T, h, w] of a clip of ``frames`` x ``size`` x ``size``."""
    side = size // config.spatial_compression
    return (config.latent_channels, config.latent_frames(frames), side, side)


class StepClips(torch.utils.data.Dataset):
    """Item ``step``: this process's clips [b, 3, F, S, S] of that step's global batch and their posterior noise
    [b, L, T, h, w] (loadable in DataLoader workers)."""

    def __init__(self, run: VaeRun, plan: list[list[int]]):
        args = run.args
        self.samples, self.buckets, self.plan, self.config = run.samples, run.buckets, plan, run.config
        per_rank = args.batch_size // run.procs.world
        self.slots = range(run.procs.rank * per_rank, (run.procs.rank + 1) * per_rank)
        self.seed, self.stride, self.size, self.crop = args.seed, args.stride, args.size, (args.min_crop, args.max_crop)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        clips, noise = [], []
        for slot in self.slots:
            pos = self.plan[step][slot]
            frames = self.buckets[pos].frames
            g = seeded(self.seed, step, slot, 0)
            clips.append(crop_resize(read_clip(self.samples[pos], frames, self.stride, g), self.size, self.crop, g))
            shape = latent_shape(self.config, frames, self.size)
            noise.append(torch.randn(shape, generator=seeded(self.seed, step, slot, 1)))
        return torch.stack(clips), torch.stack(noise)


def validation_clip(run: VaeRun, pos: int) -> torch.Tensor:
    """Sample ``pos``'s fixed validation clip [1, 3, F, S, S]: frames from a start fixed by the seed, the whole
    shorter side centred."""
    sample = run.samples[pos]
    frames = read_clip(sample, run.buckets[pos].frames, run.args.stride, seeded(run.args.seed, -1, sample.index))
    return crop_resize(frames, run.args.size, (1.0, 1.0), None)[None]


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class VaeRun:
    """Everything a running VAE training job holds."""

    args: argparse.Namespace
    procs: Processes
    output: Path
    config: VAEConfig
    config_json: dict  # written as vae/config.json (the source's own, so its layout and keys are kept)
    source: Path | None  # --vae, or None when trained from --config
    samples: list
    buckets: list
    dtype: torch.dtype
    vae: MagvitVAE | None = None
    model: nn.Module | None = None  # Autoencoding, maybe wrapped in DDP
    discriminators: Discriminators | None = None
    discriminator_model: nn.Module | None = None  # Discriminators, maybe wrapped in DDP
    perceptual: PerceptualDistance | None = None
    optimizer: torch.optim.Optimizer | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    log: Callable[[str], None] = print

    def autocast(self):
        if self.dtype != torch.float32:
            return torch.autocast(self.procs.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def adversarial(self, index: int) -> bool:
        """Whether 0-based step ``index`` trains with the discriminators (official adopt_weight: from disc_start)."""
        return self.discriminators is not None and index >= self.args.disc_start


@dataclass
class StepLosses:
    """One step's losses over the global batch (official units, see vae_losses.py) and the per-pixel L1."""

    loss: float
    l1: float
    kl: float
    outlier: float
    perceptual: float | None = None
    d_weight: float | None = None
    g_loss: float | None = None
    d_loss: float | None = None

    def entry(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def generator_step(
    run: VaeRun, index: int, video: torch.Tensor, noise: torch.Tensor
) -> tuple[StepLosses, torch.Tensor]:
    """Forward and backward of the VAE on this process's clips; returns the global losses and the (detached)
    reconstructions for the discriminators."""
    args, procs = run.args, run.procs
    world, batch = procs.world, args.batch_size
    with run.autocast():
        recon, mean, logvar = run.model(video, noise)
        perceptual = None
        if run.perceptual is not None:
            b, _, f = video.shape[:3]
            frames = [t.transpose(1, 2).flatten(0, 1) for t in (video, recon)]
            perceptual = run.perceptual(*frames).view(b, f)
    rec = reconstruction_per_sample(video, recon, args.l1_weight, args.l2_weight, perceptual).sum()
    kl = kl_per_sample(mean, logvar).sum()
    outlier = outlier_penalty_per_sample(mean, args.outlier_penalty_r).sum()
    # Each term is this process's share of the global batch mean; DDP averages gradients over the processes,
    # so the backward loss is scaled by the world size.
    nll = rec / batch
    share = nll + args.kl_weight * kl / batch + args.outlier_penalty_weight * outlier / batch
    d_weight = g_share = None
    if run.adversarial(index):
        run.discriminators.requires_grad_(False)  # the VAE's step: the discriminators are fixed
        with run.autocast():
            g_share = generator_loss(run.discriminators.logits(recon)) / world  # local mean / world
        run.discriminators.requires_grad_(True)
        d_weight = global_adaptive_weight(run, nll, g_share)
        share = share + d_weight * g_share
    (share * world).backward()
    l1_sum = (recon.detach().float() - video.float()).abs().sum()
    losses = StepLosses(
        loss=procs.total(float(share.detach())),
        l1=procs.total(float(l1_sum)) / (batch * video[0].numel()),
        kl=procs.total(float(kl.detach())) / batch,
        outlier=procs.total(float(outlier.detach())) / batch,
        perceptual=procs.total(float(perceptual.detach().mean(1).sum())) / batch if perceptual is not None else None,
        d_weight=d_weight,
        g_loss=procs.total(float(g_share.detach())) if g_share is not None else None,
    )
    return losses, recon.detach()


def global_adaptive_weight(run: VaeRun, nll_share: torch.Tensor, g_share: torch.Tensor) -> float:
    """The official adaptive weight from the gradients of the global NLL and adversarial losses at the decoder's
    last layer (each process's shares, summed over the processes: the one-process value)."""
    last_layer = run.vae.decoder.conv_out.weight
    grads = [torch.autograd.grad(t, last_layer, retain_graph=True)[0] for t in (nll_share, g_share)]
    both = torch.stack(grads).float()
    if run.procs.world > 1:
        dist.all_reduce(both)
    return adaptive_weight(both[0], both[1], run.args.disc_weight)


def discriminator_step(run: VaeRun, video: torch.Tensor, recon: torch.Tensor) -> float:
    """Forward and backward of the discriminators on this process's clips and reconstructions; returns the global
    hinge loss (each process's is a mean over equal shares: DDP's average is the global one)."""
    with run.autocast():
        real, fake = run.discriminator_model(video, recon)
    loss = hinge_discriminator_loss(real, fake)
    loss.backward()
    return run.procs.total(float(loss.detach())) / run.procs.world


def optimizer_step(run: VaeRun, optimizer: torch.optim.Optimizer, params) -> None:
    """Clip (with --max-grad-norm), step and clear the gradients."""
    if run.args.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, run.args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(run: VaeRun, index: int, video: torch.Tensor, noise: torch.Tensor) -> StepLosses:
    """One optimizer step of the VAE (and, once adversarial, of the discriminators) at 0-based step ``index``."""
    device = run.procs.device
    video, noise = video.to(device, non_blocking=True), noise.to(device, non_blocking=True)
    losses, recon = generator_step(run, index, video, noise)
    optimizer_step(run, run.optimizer, run.vae.parameters())
    if run.adversarial(index):
        losses.d_loss = discriminator_step(run, video, recon)
        optimizer_step(run, run.disc_optimizer, run.discriminators.parameters())
    return losses


# --------------------------------------------------------------------------------------------------
# Checks (before any data or weight is read)
# --------------------------------------------------------------------------------------------------


def _check_numbers(args) -> None:
    """Every numeric option in range: the first check, before any file is read."""
    official = "official: {}"
    check_number("--max-steps", args.max_steps, low=1, fix="give at least 1")
    check_number("--checkpoint-every", args.checkpoint_every, low=1, fix="give at least 1")
    check_number("--keep-checkpoints", args.keep_checkpoints, low=1, fix="keep at least 1 (or leave it out: keep all)")
    check_number("--batch-size", args.batch_size, low=1, fix="the global batch: at least 1 clip a step")
    check_number("--size", args.size, low=16, fix="a multiple of 16, e.g. 256 (official)")
    check_number("--frames", args.frames, low=1, fix="4k+1, e.g. 49 (official)")
    check_number("--stride", args.stride, low=1, fix="1 takes every frame (official)")
    check_number("--min-crop", args.min_crop, low=0, low_open=True, high=1, fix=official.format(0.25))
    check_number("--max-crop", args.max_crop, low=0, low_open=True, high=1, fix=official.format(1.0))
    if args.min_crop > args.max_crop:
        raise ValueError(f"--min-crop {args.min_crop} is above --max-crop {args.max_crop}; swap them")
    check_number("--lr", args.lr, low=0, low_open=True, fix="e.g. 1e-4 (official)")
    check_number("--disc-lr", args.disc_lr, low=0, low_open=True, fix="or leave it out: --lr")
    check_number("--warmup-steps", args.warmup_steps, low=0, fix="a whole number")
    check_number("--weight-decay", args.weight_decay, low=0, fix="0 turns it off; " + official.format(0.05))
    check_number("--adam-eps", args.adam_eps, low=0, low_open=True, fix=official.format(1e-8))
    check_number("--max-grad-norm", args.max_grad_norm, low=0, fix="0: no clipping (official)")
    for flag, value, default in (
        ("--l1-weight", args.l1_weight, 1.0),
        ("--l2-weight", args.l2_weight, 0.1),
        ("--kl-weight", args.kl_weight, 1e-6),
        ("--outlier-penalty-weight", args.outlier_penalty_weight, 1e5),
        ("--outlier-penalty-r", args.outlier_penalty_r, 3.0),
        ("--perceptual-weight", args.perceptual_weight, 1.0),
        ("--disc-weight", args.disc_weight, 0.5),
    ):
        check_number(flag, value, low=0, fix=official.format(default))
    if not (args.l1_weight or args.l2_weight or (args.perceptual_model and args.perceptual_weight)):
        raise ValueError(
            "--l1-weight and --l2-weight are 0 (and no perceptual term): nothing asks for a reconstruction"
        )
    check_number("--disc-start", args.disc_start, low=0, fix="the 0-based step the adversarial term starts at")
    check_number("--disc-channels", args.disc_channels, low=1, fix="official: 64")
    check_number("--disc-layers", args.disc_layers, low=1, fix="official: 3")
    check_number("--seed", args.seed, low=-(2**63), high=2**63 - 1, fix="a 64-bit integer")
    check_number("--workers", args.workers, low=0, fix="0 reads the clips in the training process")
    check_number("--validation-every", args.validation_every, low=0, fix="0: never")
    check_number("--validation-samples", args.validation_samples, low=1, fix="at least 1")
    check_number("--chunk-frames", args.chunk_frames, low=1, fix="a multiple of 4, or leave it out: the model's")
    check_number("--chunk-latents", args.chunk_latents, low=1, fix="or leave it out: the model's")


def _vae_source(args) -> tuple[VAEConfig, dict, Path | None, int]:
    """(config, config.json to write, --vae path or None, parameters) from --vae (headers only) or --config."""
    from ..loading import inspect_checkpoint, resolve_files

    if args.vae:
        path = Path(args.vae).expanduser()
        try:
            info = inspect_checkpoint(path, kind="vae")
        except ValueError as e:
            raise ValueError(f"--vae {args.vae}: {e}") from e
        stored = resolve_files(path, "vae")[1]
        if info.config.temporal_mode != "mag":
            raise ValueError(f"--vae {args.vae}: a V4 slice VAE; train-vae trains the mag VAE of V5 / V5.1")
        return info.config, stored or config_json(info.config), path, info.num_params
    file = check_input("--config", args.config)
    try:
        stored = json.loads(file.read_text(encoding="utf-8"))
        config = VAEConfig.from_dict(stored)
    except (json.JSONDecodeError, ValueError, TypeError, SyntaxError) as e:
        raise ValueError(f"--config {args.config}: not a VAE config.json ({e}); give a vae/config.json") from e
    if config.temporal_mode != "mag":
        raise ValueError(f"--config {args.config}: a V4 slice VAE (cache_compression_vae); train-vae trains mag VAEs")
    bad = [c for c in config.block_out_channels if c % config.norm_num_groups]
    if bad:
        raise ValueError(
            f"--config {args.config}: norm_num_groups {config.norm_num_groups} does not divide the block widths {bad}"
        )
    with torch.device("meta"):
        params = sum(p.numel() for p in MagvitVAE(config).parameters())
    return config, stored, None, params


def config_json(config: VAEConfig) -> dict:
    """A diffusers-style vae/config.json for ``config`` (for a --vae file that came without one)."""
    return {
        "_class_name": "AutoencoderKLMagvit",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "latent_channels": config.latent_channels,
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": list(config.down_block_types),
        "up_block_types": list(config.up_block_types),
        "layers_per_block": config.layers_per_block,
        "norm_num_groups": config.norm_num_groups,
        "norm_eps": config.norm_eps,
        "act_fn": config.act_fn,
        "scaling_factor": config.scaling_factor,
        "spatial_group_norm": config.spatial_group_norm,
        "mid_block_use_attention": config.mid_block_attention is not None,
        "mid_block_attention_type": config.mid_block_attention or "spatial",
        "cache_mag_vae": True,
        "mini_batch_encoder": config.mini_batch_encoder,
        "mini_batch_decoder": config.mini_batch_decoder,
    }


def _check_geometry(args, config: VAEConfig) -> None:
    """--frames, --size, the chunks and the discriminators fit this VAE."""
    check_video_size(
        args.frames, args.size, args.size, config, {"frames": "--frames", "height": "--size", "width": "--size"}
    )
    with torch.device("meta"):
        skeleton = MagvitVAE(config)  # its chunk rule, without memory or weights
    for flag, value, released, multiple in (
        ("--chunk-frames", args.chunk_frames, config.mini_batch_encoder, config.temporal_compression),
        ("--chunk-latents", args.chunk_latents, config.mini_batch_decoder, 1),
    ):
        try:
            skeleton.chunk_length(value, released, flag, multiple)
        except ValueError as e:
            raise ValueError(f"{e}; leave {flag} out to use the model's") from e
    if args.disc_weight:
        if args.discriminator in ("both", "2d") and frame_logits_side(args.size, args.disc_layers) < 1:
            raise ValueError(
                f"--size {args.size}: too small for the frame discriminator's {args.disc_layers} layers; "
                f"lower --disc-layers or use --discriminator 3d"
            )
        if args.discriminator in ("both", "3d") and args.disc_channels % GROUP_NORM_GROUPS:
            raise ValueError(
                f"--disc-channels {args.disc_channels}: the clip discriminator's GroupNorm needs a multiple of "
                f"{GROUP_NORM_GROUPS} (official 64)"
            )


def _check_inputs(args, procs: Processes) -> tuple[VAEConfig, dict, Path | None]:
    """Everything that can be checked before data or weights are read; ValueError naming the flag and the fix."""
    _check_numbers(args)
    if bool(args.vae) == bool(args.config):
        raise ValueError("give --vae <model folder or vae/> to fine-tune, or --config <config.json> to train anew")
    config, stored, source, params = _vae_source(args)
    _check_geometry(args, config)
    check_input("--data", args.data)
    if args.data_root:
        check_input("--data-root", args.data_root, "folder")
    if args.batch_size % procs.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {procs.world} processes")
    if args.perceptual_model:
        check_perceptual_model("--perceptual-model", args.perceptual_model)
    # A checkpoint holds the VAE and Adam's two moments in float32; the final output one more copy.
    output = check_output_folder("--output", args.output, params * 4 * 4)
    if args.resume:
        resolve_resume(output, args.resume)
        return config, stored, source
    earlier = [output / VAE_FOLDER, *list_checkpoints(output)]
    refuse_earlier_outputs(args, output, earlier)
    return config, stored, source


def _fingerprint(run: VaeRun) -> dict:
    args = run.args
    return {
        "vae": str(run.source.resolve()) if run.source else None,
        "config": digest(json.dumps(run.config_json, sort_keys=True)),
        "data": str(Path(args.data).resolve()),
        "samples": [s.index for s in run.samples],
        "batch_size": args.batch_size,
        "seed": args.seed,
        "size": args.size,
        "frames": args.frames,
        "stride": args.stride,
        "crop": [args.min_crop, args.max_crop],
        "discriminator": args.discriminator if args.disc_weight else None,
        "disc_channels": args.disc_channels if args.disc_weight else None,
        "disc_layers": args.disc_layers if args.disc_weight else None,
        "dtype": args.dtype,
        "lr": [args.lr, args.disc_lr, args.lr_scheduler, args.warmup_steps],
        "lr_schedule_steps": args.max_steps if args.lr_scheduler != "constant" else 0,
        "loss": [args.l1_weight, args.l2_weight, args.kl_weight, args.outlier_penalty_weight, args.perceptual_weight],
        "adversarial": [args.disc_start, args.disc_weight],
    }


# --------------------------------------------------------------------------------------------------
# Models, optimizers, checkpoints
# --------------------------------------------------------------------------------------------------


def _seeded_build(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with the global RNG seeded by ``seed`` (and restored after): the same weights on every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _load_models(run: VaeRun, resume: Path | None) -> None:
    """The VAE (from --vae, --config or the checkpoint), the discriminators, the perceptual model and the optimizers,
    wrapped for the process group."""
    from safetensors.torch import load_file

    from ..loading import load_vae

    args, procs = run.args, run.procs
    if resume is not None:
        vae = load_vae(resume / VAE_FOLDER, dtype=torch.float32, device=procs.device)
    elif run.source is not None:
        vae = load_vae(run.source, dtype=torch.float32, device=procs.device)
    else:
        vae = _seeded_build(args.seed, lambda: MagvitVAE(run.config)).to(procs.device)
    run.vae = vae.train().requires_grad_(True)
    model = Autoencoding(run.vae, args.chunk_frames, args.chunk_latents, args.gradient_checkpointing)
    run.model = _data_parallel(procs, model)
    betas = (0.9, 0.999)
    run.optimizer = torch.optim.AdamW(
        run.vae.parameters(), lr=args.lr, betas=betas, weight_decay=args.weight_decay, eps=args.adam_eps
    )
    if args.disc_weight:
        kind, channels, layers = args.discriminator, args.disc_channels, args.disc_layers
        discs = _seeded_build(args.seed + 1, lambda: Discriminators(kind, channels, layers)).to(procs.device)
        if resume is not None:
            discs.load_state_dict(load_file(resume / DISCRIMINATOR_FILE))
        run.discriminators = discs.train()
        run.discriminator_model = _data_parallel(procs, discs)
        run.disc_optimizer = torch.optim.AdamW(
            discs.parameters(),
            lr=args.disc_lr or args.lr,
            betas=betas,
            weight_decay=args.weight_decay,
            eps=args.adam_eps,
        )
    if args.perceptual_model:
        run.perceptual = PerceptualDistance(args.perceptual_model).to(procs.device)


def _data_parallel(procs: Processes, module: nn.Module) -> nn.Module:
    """``module`` in DDP when there are several processes (buffers per process: the BatchNorm statistics)."""
    if procs.world == 1:
        return module
    ids = [procs.device.index] if procs.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def _named_optimizers(run: VaeRun) -> list[tuple[str, nn.Module, torch.optim.Optimizer]]:
    """(prefix, module, optimizer) of each optimizer (the checkpoint keeps both in one state, names prefixed)."""
    pairs = [("vae.", run.vae, run.optimizer)]
    if run.disc_optimizer is not None:
        pairs.append(("discriminator.", run.discriminators, run.disc_optimizer))
    return pairs


def _optimizer_state(run: VaeRun) -> dict:
    """Both optimizers' states as one, keyed by prefixed parameter names."""
    state, groups = {}, []
    for prefix, module, optimizer in _named_optimizers(run):
        names = [prefix + n for n, _ in module.named_parameters()]
        saved = optimizer.state_dict()
        state |= {names[i]: v for i, v in saved["state"].items()}
        groups += [dict(g, params=[names[i] for i in g["params"]]) for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def _load_optimizer_state(run: VaeRun, state: dict) -> None:
    """Undo :func:`_optimizer_state` into the run's optimizers."""
    for prefix, module, optimizer in _named_optimizers(run):
        index = {prefix + n: i for i, (n, _) in enumerate(module.named_parameters())}
        groups = [g for g in state["param_groups"] if g["params"] and g["params"][0].startswith(prefix)]
        if not groups:
            raise ValueError(f"the checkpoint has no optimizer state for the {prefix.rstrip('.')}; start a new run")
        optimizer.load_state_dict(
            {
                "state": {index[n]: v for n, v in state["state"].items() if n in index},
                "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in groups],
            }
        )


def _write_weights(run: VaeRun, folder: Path, dtype: torch.dtype) -> None:
    """``folder/vae`` (a VAE folder load_vae reads) and the discriminators' weights (rank 0)."""
    write_transformer_folder(folder / VAE_FOLDER, run.vae.state_dict(), run.config_json, dtype, WHOLE_FILE)
    if run.discriminators is not None:
        save_tensors(folder / DISCRIMINATOR_FILE, run.discriminators.state_dict())


def save_checkpoint(run: VaeRun, step: int, epoch: int, fingerprint: dict, loss_log: LossLog | None) -> None:
    """A checkpoint of ``step`` (every process takes part; rank 0 writes)."""
    rngs = run.procs.gather(rng_state())
    if run.procs.main:
        state = {"step": step, "epoch": epoch, "world_size": run.procs.world, "fingerprint": fingerprint}
        write_checkpoint(
            checkpoint_dir(run.output, step),
            lambda tmp: _write_weights(run, tmp, torch.float32),
            _optimizer_state(run),
            state,
            rngs,
        )
        prune_checkpoints(run.output, run.args.keep_checkpoints)
        plot_losses(loss_log.entries, run.output / "loss.png")
    run.procs.barrier()


@torch.no_grad()
def validate(run: VaeRun, step: int, clips: list[torch.Tensor]) -> float | None:
    """Reconstructions of the validation clips through ``MagvitVAE.encode`` / ``decode`` (posterior means), written
    as videos (clip | reconstruction, side by side); returns their L1 (rank 0; None elsewhere)."""
    from ..video_io import write_video

    if not run.procs.main:
        return None
    device, errors = run.procs.device, []
    for i, clip in enumerate(clips):
        video = clip.to(device)
        with run.autocast():
            mean, _ = run.vae.encode(video)
            recon = run.vae.decode(mean).clamp(-1, 1)
        errors.append(float((recon.float() - video).abs().mean()))
        pair = torch.cat([video, recon.float()], dim=4)[0]  # [3, F, S, 2S]
        frames = ((pair + 1) / 2).permute(1, 2, 3, 0).cpu()  # [F, S, 2S, 3]
        meta = {"step": step, "sample": run.samples[i].index, "l1": errors[-1]}
        write_video(run.output / "validation" / f"step-{step:06d}-{i}.mp4", frames, metadata=meta)
    l1 = sum(errors) / len(errors)
    with (run.output / "validation.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "l1": l1, "per_clip": errors}) + "\n")
    return l1


def _final_output(run: VaeRun) -> Path:
    """``output/vae`` in --save-dtype, written atomically (rank 0); returns its path."""
    target = run.output / VAE_FOLDER
    if run.procs.main:
        with atomic_dir(target) as tmp:
            write_transformer_folder(
                tmp, run.vae.state_dict(), run.config_json, SAVE_DTYPES[run.args.save_dtype], WHOLE_FILE
            )
    run.procs.barrier()
    return target


@dataclass
class VaeTrainResult:
    losses: dict[int, float]  # step -> loss of the steps this call trained
    output: Path  # the vae/ folder
    steps: int
    seconds: float  # training loop time (after loading)
    entries: dict[int, dict] = field(default_factory=dict)  # step -> every logged loss term
    validation: dict[int, float] = field(default_factory=dict)  # step -> validation L1


def run_vae_training(args, on_step: Callable[[int, float], None] | None = None) -> VaeTrainResult:
    """Train as ``args`` say (see ``add_train_vae_arguments``); resumes from ``args.resume`` if set."""
    return run_in_processes(args.device, lambda procs: _train(args, procs, on_step))


def _train(args, procs: Processes, on_step) -> VaeTrainResult:
    from tqdm import tqdm

    log = print if procs.main else (lambda *a, **k: None)
    config, stored, source = _check_inputs(args, procs)
    output = Path(args.output).expanduser()
    resume = resolve_resume(output, args.resume) if args.resume else None
    log(
        f"{procs.world} process{'es' if procs.world > 1 else ''} on {procs.device.type}; global batch "
        f"{args.batch_size} ({args.batch_size // procs.world} a process)"
    )
    if unlaunched_processes():
        log("warning: accelerate launch started this process alone (on the CPU it needs --multi_cpu); 1 process")
    probes = ProbeCache(output / PROBE_CACHE)  # a restarted run re-probes only new or changed files
    samples = load_dataset(args.data, args.data_root, 1, args.skip_bad_samples, log, probes=probes)
    if procs.main and probes.probed:
        probes.save()
    buckets = [Bucket(args.frames if s.kind == "video" else 1, args.size, args.size) for s in samples]
    videos = sum(s.kind == "video" for s in samples)
    log(f"{len(samples)} samples ({videos} videos as {args.frames}-frame clips, {len(samples) - videos} images)")
    run = VaeRun(args, procs, output, config, stored, source, samples, buckets, DTYPES[args.dtype], log=log)
    fingerprint = _fingerprint(run)

    start = start_run(args, procs, output, resume, fingerprint, STRICT_KEYS, log)
    start_step, saved = start.step, start.saved
    _load_models(run, resume)
    if resume:
        _load_optimizer_state(run, start.optimizer_state)
    params = sum(p.numel() for p in run.vae.parameters())
    origin = f"resumed from {resume}" if resume else f"fine-tuning {source}" if source else "from scratch"
    log(f"VAE: {params:,} parameters ({origin})")

    plan, epochs = step_plan(buckets, args.batch_size, args.seed, args.max_steps)
    loader = torch.utils.data.DataLoader(
        StepClips(run, plan),
        batch_size=None,
        sampler=range(start_step, args.max_steps),
        num_workers=args.workers,
        collate_fn=as_is,
    )
    validation_clips = []
    if args.validation_every and procs.main:
        validation_clips = [validation_clip(run, i) for i in range(min(args.validation_samples, len(samples)))]
    if resume and start.rng is not None and saved["world_size"] == procs.world:
        set_rng_state(*start.rng)
    loss_log = LossLog(output / "loss.jsonl", start_step if resume else None) if procs.main else None
    result = VaeTrainResult({}, output / VAE_FOLDER, start_step, 0.0)
    bar = tqdm(total=args.max_steps, initial=start_step, desc="training the VAE", unit="step", disable=not procs.main)
    step, started = start_step, time.perf_counter()
    try:
        with StopSignals(log) as signals:
            for index, (video, noise) in zip(range(start_step, args.max_steps), loader, strict=True):
                lr = lr_factor(index, args.max_steps, args.warmup_steps, args.lr_scheduler)
                for prefix, _, optimizer in _named_optimizers(run):
                    base = (args.disc_lr or args.lr) if prefix == "discriminator." else args.lr
                    for group in optimizer.param_groups:
                        group["lr"] = base * lr
                losses = train_step(run, index, video, noise)
                if not math.isfinite(losses.loss):
                    raise ValueError(
                        f"the loss became {losses.loss} at step {index + 1}; lower --lr or use --dtype fp32"
                    )
                step = index + 1
                result.losses[step], result.entries[step] = losses.loss, losses.entry()
                if loss_log:
                    loss_log.append({"step": step, **losses.entry(), "lr": args.lr * lr, "epoch": epochs[index]})
                bar.update(1)
                bar.set_postfix(l1=f"{losses.l1:.4f}", kl=f"{losses.kl:.3g}")
                if on_step:
                    on_step(step, losses.loss)
                stopping = procs.any(signals.received is not None)  # every process stops at the same step
                if step % args.checkpoint_every == 0 or step == args.max_steps or stopping:
                    save_checkpoint(run, step, epochs[index], fingerprint, loss_log)
                if stopping and step < args.max_steps:
                    raise TrainingStopped(step, output, signals.received or "a signal", resume_command(args))
                if args.validation_every and step % args.validation_every == 0:
                    l1 = validate(run, step, validation_clips)
                    if l1 is not None:
                        result.validation[step] = l1
    except KeyboardInterrupt as e:
        raise TrainingInterrupted(step, output, resume_command(args)) from e
    finally:
        bar.close()
    result.seconds, result.steps = time.perf_counter() - started, step
    trained = step - start_step
    log(f"trained {trained} steps in {result.seconds:.1f} s ({trained / max(result.seconds, 1e-9):.2f} steps/s)")
    _final_output(run)
    log(f"wrote {result.output} after {step} steps; loss log {output / 'loss.jsonl'}, plot {output / 'loss.png'}")
    return result


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_train_vae_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``easyanimate train-vae`` (defaults: the official mag-v2 VAE training)."""
    g = p.add_argument_group("model and data")
    g.add_argument("--vae", help="fine-tune this VAE: a model folder with vae/, a vae/ folder or a .safetensors file")
    g.add_argument("--config", help="train a new VAE (random weights from --seed) of this vae/config.json")
    g.add_argument("--data", required=True, help="metadata JSON: a list of {file_path, text, type: video|image}")
    g.add_argument("--data-root", help="folder that relative file_path values start from (default: the JSON's)")
    g.add_argument("--output", required=True, help="output folder (vae/, checkpoints, logs, validation videos)")
    g.add_argument("--skip-bad-samples", action="store_true", help="train without the entries that fail the checks")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes reading the clips")

    g = p.add_argument_group("clips")
    g.add_argument("--size", type=int, default=256, help="side of the square training clips (official 256)")
    g.add_argument("--frames", type=int, default=49, help="frames per video clip, 4k+1 (official 49)")
    g.add_argument("--stride", type=int, default=1, help="frame stride of video clips (official 1)")
    g.add_argument("--min-crop", type=float, default=0.25, help="smallest crop, x the shorter side (official 0.25)")
    g.add_argument("--max-crop", type=float, default=1.0, help="largest crop, x the shorter side (official 1)")

    g = p.add_argument_group("loss (official mag-v2 weights)")
    g.add_argument("--l1-weight", type=float, default=1.0, help="L1 reconstruction weight (official 1.0)")
    g.add_argument("--l2-weight", type=float, default=0.1, help="L2 reconstruction weight (official 0.1)")
    g.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight (official 1e-6)")
    g.add_argument("--outlier-penalty-weight", type=float, default=1e5, help="official 1e5; 0 turns it off")
    g.add_argument("--outlier-penalty-r", type=float, default=3.0, help="penalised beyond r std (official 3)")
    g.add_argument(
        "--perceptual-model",
        help="local transformers image model folder (config.json + safetensors) whose hidden states the perceptual "
        "term compares (official: LPIPS, whose weights are not shipped); default: no perceptual term",
    )
    g.add_argument("--perceptual-weight", type=float, default=1.0, help="with --perceptual-model (official 1.0)")
    g.add_argument("--disc-weight", type=float, default=0.5, help="adversarial weight (official 0.5; 0: none)")
    g.add_argument(
        "--disc-start", type=int, default=50001, help="0-based step the adversarial term starts at (official 50001)"
    )
    g.add_argument(
        "--discriminator",
        choices=DISCRIMINATOR_KINDS,
        default="both",
        help="frame PatchGAN (2d), clip discriminator (3d) or both (official)",
    )
    g.add_argument("--disc-channels", type=int, default=64, help="discriminators' first width (official 64)")
    g.add_argument("--disc-layers", type=int, default=3, help="frame PatchGAN's stride-2 layers (official 3)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=1, help="global batch (over all processes; official 1)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (official base_learning_rate 1e-4)")
    g.add_argument("--disc-lr", type=float, help="the discriminators' learning rate (default: --lr, as official)")
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULES, default="constant")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=5e-2, help="AdamW weight decay (official 5e-2)")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon (official: torch's 1e-8)")
    g.add_argument("--max-grad-norm", type=float, default=0.0, help="gradient clipping (official: none, 0)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (official fp32)")
    g.add_argument("--save-dtype", choices=list(SAVE_DTYPES), default="fp32", help="dtype of the written vae/")
    g.add_argument("--chunk-frames", type=int, help="encoder frames per chunk after frame 0 (default: the model's)")
    g.add_argument("--chunk-latents", type=int, help="decoder latents per chunk after latent 0 (default: the model's)")
    g.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute each chunk in the backward pass (less memory)"
    )
    g.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")

    g = p.add_argument_group("checkpoints and validation")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=int, help="keep only the newest N checkpoints (default: keep all)")
    g.add_argument("--resume", help="'latest' or a checkpoint folder (default: start a new run)")
    g.add_argument(
        "--validation-every", type=int, default=5000, help="steps between validation videos (official 5000; 0: never)"
    )
    g.add_argument(
        "--validation-samples", type=int, default=8, help="the dataset's first N samples are validated (official 8)"
    )


def train_vae_main(args) -> int:
    """Run ``easyanimate train-vae``; returns the exit code (errors are printed, not raised)."""
    return exit_code(run_vae_training, args)


def main(argv: list[str] | None = None) -> int:
    """``python -m easyanimate_core.training.vae_trainer``: the command before the CLI wires it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="easyanimate train-vae", description=__doc__.split("\n")[0])
    add_train_vae_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = ["train-vae", *argv]  # the resume hint names the CLI command
    return train_vae_main(args)


if __name__ == "__main__":
    sys.exit(main())
