"""`easyanimate train`: LoRA (default) or full fine-tuning of the V5 / V5.1 transformer; resumable, distributed.

    add_train_arguments(parser)        the command's options
    train_main(args) -> exit code      the command (errors printed, Ctrl-C reported with the resume hint)
    run_training(args, on_step=None)   the run; ``on_step(step, loss)`` is called after every optimizer step

One step, per sample (spec §4 and §6; the official scripts/train_lora.py):
* the clip (dataset.py) is VAE-encoded and a latent drawn from the posterior, times the scaling factor;
* V5.1 regresses the flow velocity noise - x0 at sigma = (t + 1) / 1000, V5 the v-prediction target on its
  zero-terminal-SNR schedule (``sampling.training_target``), t uniform in [0, 1000);
* InP models train in inpaint mode: a random mask (start frames, start and end, a box, random frames, or
  everything for text-to-video) gives [mask ; masked-video latents] as ``pipeline.inpaint_latents`` does,
  with noise exp(N(-3, 0.5)) on the kept pixels as the official trainer;
* captions are dropped (empty prompt) with probability ``--caption-dropout`` for classifier-free guidance;
* the loss is the official masked MSE (elements off by more than 50 are ignored), averaged over the batch.

Reproducibility: every draw for a sample (clip start, caption dropout, posterior sample, mask, noise,
timestep) comes from a generator seeded by (seed, step, position in the global batch). A resumed run and
a run on any number of processes draw the same numbers for the same global batch, so they train alike.

Distributed: run under ``torchrun`` or ``accelerate launch`` (RANK / WORLD_SIZE / LOCAL_RANK). Each process
takes its slice of every global batch; DDP (or FSDP2 ``fully_shard`` with ``--fsdp`` in full mode) averages
the gradients. Beyond that only the logged loss is summed across processes (one all_reduce) and the RNG
states are gathered into checkpoints. The output folder must be visible to every process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .. import sampling
from ..atomic import atomic_dir
from ..checks import (
    check_input,
    check_memory,
    check_number,
    check_output_folder,
    check_video_size,
    generation_memory_bytes,
    training_memory_bytes,
)
from ..lora import LoraNetwork, lora_targets, save_lora
from ..text_encoders import PromptPair
from .dataset import (
    PROBE_CACHE,
    BucketRule,
    ProbeCache,
    describe_buckets,
    load_dataset,
    step_plan,
)
from .examples import (
    Example,
    StepExamples,
    TextEmbeddings,
    as_is,
    build_inpaint_cache,
    build_latent_cache,
    digest,
    draw_inpaint_input,
    seeded,
)
from .files import (
    LossLog,
    checkpoint_dir,
    list_checkpoints,
    plot_losses,
    prune_checkpoints,
    resolve_resume,
    rng_state,
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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOSS_THRESHOLD = 50.0  # official custom_mse_loss ignores elements off by more
# Fingerprint entries a resumed run must share with its checkpoint (they decide what is trained on).
STRICT_KEYS = ("model", "mode", "rank", "alpha", "lora_targets", "data", "samples", "batch_size", "seed", "buckets")


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Text embeddings and latents computed before training
# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error [B] in float32, ignoring elements off by more than 50 (official)."""
    diff = pred.float() - target.float()
    return (diff.square() * (diff.abs() <= LOSS_THRESHOLD)).flatten(1).mean(1)


def model_inputs(run: Run, ex: Example, step: int) -> dict[str, torch.Tensor | str | None]:
    """The noisy latents, target, timestep and caption of one Example, and for inpaint mode its mask and masked
    clip (encoded later, with the rest of the micro-batch); the draws come in a fixed order per example."""
    g, device, vae = seeded(run.args.seed, step, ex.slot, 1), run.procs.device, run.vae
    text = "" if float(torch.rand((), generator=g)) < run.args.caption_dropout else ex.text
    if ex.moments is not None:
        mean, logvar = ex.moments["mean"][None].float(), ex.moments["logvar"][None].float()
    else:
        with torch.no_grad():
            mean, logvar = (m.cpu() for m in vae.encode(ex.pixels[None].to(device)))
    eps = torch.randn(mean.shape, generator=g)
    x0 = (mean + (0.5 * logvar).exp() * eps) * vae.config.scaling_factor
    mask = masked = None
    if run.inpaint_channels and run.inpaint and ex.inpaint is None:
        mask, masked = draw_inpaint_input(ex.pixels[None], g)
    noise = torch.randn(x0.shape, generator=g)
    t = sampling.training_timesteps(1, generator=g)
    noisy, target, timestep = sampling.training_target(run.version, x0, noise, t)
    return {
        "noisy": noisy,
        "target": target,
        "timestep": timestep,
        "text": text,
        "mask": mask,
        "masked": masked,
        "cached_inpaint": ex.inpaint,
    }


@torch.no_grad()
def inpaint_batch(run: Run, items: list[dict], latent_shape: tuple[int, ...]) -> torch.Tensor:
    """[B, 1 + L, ...] inpaint latents of a micro-batch: every masked clip through the VAE in one batch (one
    call instead of one per sample: on a GPU the per-sample calls, not the transformer, bounded the step)."""
    from ..pipeline import encode_mean, inpaint_from_masked

    device = run.procs.device
    inpaint = torch.zeros(len(items), run.inpaint_channels, *latent_shape[2:], device=device)
    for i, it in enumerate(items):
        if it["cached_inpaint"] is not None:
            inpaint[i] = it["cached_inpaint"].to(device)
    kept = [i for i, it in enumerate(items) if it["masked"] is not None]
    if kept:
        latents = encode_mean(run.vae, torch.cat([items[i]["masked"] for i in kept]), device)
        for row, i in enumerate(kept):
            inpaint[i] = inpaint_from_masked(run.vae, latents[row : row + 1], items[i]["mask"], device)[0]
    return inpaint


def train_step(run: Run, step: int, examples: list[Example]) -> float:
    """Forward and backward over this process's examples; returns the sum of their losses."""
    args, device = run.args, run.procs.device
    micro = args.micro_batch or len(examples)
    total = 0.0
    for start in range(0, len(examples), micro):
        items = [model_inputs(run, ex, step) for ex in examples[start : start + micro]]
        text = run.text.get([it["text"] for it in items])
        kwargs = {"encoder_hidden_states": text.embeds.to(device, run.input_dtype)}
        if text.embeds_2 is not None:
            kwargs["encoder_hidden_states_t5"] = text.embeds_2.to(device, run.input_dtype)
        noisy = torch.cat([it["noisy"] for it in items]).to(device, run.input_dtype)
        if run.inpaint_channels:
            kwargs["inpaint_latents"] = inpaint_batch(run, items, tuple(noisy.shape)).to(run.input_dtype)
        target = torch.cat([it["target"] for it in items]).to(device)
        timestep = torch.cat([it["timestep"] for it in items]).to(device, run.input_dtype)
        with run.autocast():
            pred = run.model(noisy, timestep, **kwargs)
        losses = masked_mse(pred[:, : target.shape[1]], target)
        # DDP averages gradients over processes: scaling by world / global batch makes them the global mean.
        loss = losses.sum() * run.procs.world / args.batch_size
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        total += float(losses.detach().sum())
    return total


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


class TrainedModel(nn.Module):
    """The transformer plus its LoRA network, as one module for DDP / FSDP (forward = the transformer's)."""

    def __init__(self, transformer: nn.Module, network: LoraNetwork | None):
        super().__init__()
        self.transformer, self.network = transformer, network

    def forward(self, *args, **kwargs):
        return self.transformer(*args, **kwargs)


@dataclass
class Run:
    """Everything a running training job holds."""

    args: argparse.Namespace
    procs: Processes
    root: Path
    output: Path
    version: str
    variant: str
    samples: list
    buckets: list
    dtype: torch.dtype
    inpaint_channels: int = 0
    inpaint: bool = False
    vae: nn.Module | None = None
    text: TextEmbeddings | None = None
    transformer: nn.Module | None = None
    network: LoraNetwork | None = None
    model: nn.Module | None = None  # what the loop calls: TrainedModel, maybe wrapped in DDP / FSDP
    optimizer: torch.optim.Optimizer | None = None
    params: list[tuple[str, nn.Parameter]] = dataclasses.field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None
    log: Callable[[str], None] = print

    @property
    def full(self) -> bool:
        return self.args.mode == "full"

    @property
    def input_dtype(self) -> torch.dtype:
        """LoRA runs hold the base weights in the training dtype; full runs keep float32 masters + autocast."""
        return torch.float32 if self.full else self.dtype

    def autocast(self):
        if self.full and self.dtype != torch.float32:
            return torch.autocast(self.procs.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def progress(self, items, desc: str):
        from tqdm import tqdm

        return tqdm(items, desc=desc, disable=not self.procs.main or not items, leave=False)

    def metadata(self, step: int) -> dict:
        args = self.args
        meta = {
            "ss_network_module": "easyanimate_core.lora",
            "ss_base_model_version": f"EasyAnimate{self.version}",
            "ss_sd_model_name": self.root.name,
            "ss_network_dim": args.rank,
            "ss_network_alpha": args.alpha if args.alpha is not None else args.rank,
            "ss_steps": step,
            "ss_learning_rate": args.lr,
            "ss_seed": args.seed,
            "ss_num_train_images": len(self.samples),
            "easyanimate_variant": self.variant,
            "easyanimate_lora_targets": " ".join(args.lora_targets or ["*"]),
        }
        return meta


def _check_numbers(args) -> None:
    """Every numeric option in range: the first check, before any file is read."""
    whole = "give a whole number"
    for flag, value in (("--max-steps", args.max_steps), ("--checkpoint-every", args.checkpoint_every)):
        check_number(flag, value, low=1, fix="give at least 1")
    check_number("--batch-size", args.batch_size, low=1, fix="the global batch: at least 1 sample a step")
    check_number("--micro-batch", args.micro_batch, low=1, fix="at least 1 sample a forward pass (or leave it out)")
    check_number("--keep-checkpoints", args.keep_checkpoints, low=1, fix="keep at least 1 (or leave it out: keep all)")
    check_number("--rank", args.rank, low=1, fix="the LoRA rank, e.g. 64 or 128")
    check_number("--alpha", args.alpha, low=0, low_open=True, fix="e.g. the rank, or half of it")
    check_number("--lr", args.lr, low=0, low_open=True, fix="e.g. 1e-4 for a LoRA, 2e-5 for full fine-tuning")
    check_number("--warmup-steps", args.warmup_steps, low=0, fix=whole)
    check_number("--weight-decay", args.weight_decay, low=0, fix="0 turns it off; released: 5e-2")
    check_number("--adam-eps", args.adam_eps, low=0, low_open=True, fix="released: 1e-10")
    check_number("--max-grad-norm", args.max_grad_norm, low=0, low_open=True, fix="released: 0.05")
    check_number("--caption-dropout", args.caption_dropout, low=0, high=1, fix="a probability, e.g. 0.1")
    check_number("--seed", args.seed, low=-(2**63), high=2**63 - 1, fix="a 64-bit integer")
    BucketRule(tuple(args.resolutions), args.frames, 1)  # ValueError for --frames / --resolutions it cannot use
    check_number("--stride", args.stride, low=1, fix="1 takes every frame")
    check_number("--token-budget", args.token_budget, low=1, fix="or leave it out")
    check_number("--min-frames", args.min_frames, low=1, fix=whole)
    check_number("--workers", args.workers, low=0, fix="0 reads the clips in the training process")
    check_number("--shard-size", args.shard_size, low=0, low_open=True, fix="GiB per file, e.g. 5")
    check_number("--validation-every", args.validation_every, low=0, fix="0: never")
    check_number("--validation-steps", args.validation_steps, low=1, fix="e.g. 25")
    for flag, value in (("--validation-height", args.validation_height), ("--validation-width", args.validation_width)):
        check_number(flag, value, low=1, fix="a positive multiple of 16")
    if args.validation_prompt and not args.validation_every:
        raise ValueError("--validation-prompt is given but --validation-every is 0 (never): add --validation-every N")
    if args.validation_every and not args.validation_prompt:
        raise ValueError(f"--validation-every {args.validation_every} needs a --validation-prompt (what to generate)")
    if not args.name or Path(args.name).name != args.name or args.name in (".", ".."):
        raise ValueError(f"--name {args.name!r}: must be a plain file name (no folders), e.g. my_lora")


def _check_inputs(args, procs: Processes) -> tuple[Path, object]:
    """Everything that can be checked before data or weights are read; ValueError naming the flag and the fix."""
    from ..checks import transformer_skeleton
    from ..loading import inspect_checkpoint
    from ..text_encoders import check_text_encoder_files

    _check_numbers(args)
    root = check_input("--model", args.model, "folder")
    if not (root / "transformer").is_dir() or not (root / "vae").is_dir():
        raise ValueError(f"--model {root}: expected a model folder with transformer/, vae/ and the text encoder(s)")
    info = inspect_checkpoint(root / "transformer", kind="transformer")
    vae_info = inspect_checkpoint(root / "vae", kind="vae")
    if info.variant not in ("T2V", "InP"):
        raise ValueError(f"{root} is a {info.variant} model; training supports T2V and InP models")
    if info.version == "V4":
        raise ValueError(f"--model {root}: a V4 model; training supports V5 and V5.1 models")
    check_text_encoder_files(root, info.version.lower())
    check_input("--data", args.data)
    if args.data_root:
        check_input("--data-root", args.data_root, "folder")
    if args.batch_size % procs.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {procs.world} processes")
    per_rank = args.batch_size // procs.world
    if args.micro_batch and per_rank % args.micro_batch:
        raise ValueError(f"--micro-batch {args.micro_batch} must divide the per-process batch {per_rank}")
    if args.fsdp and not args.mode == "full":
        raise ValueError("--fsdp shards full fine-tuning; LoRA runs use DDP (drop --fsdp)")
    if args.cache_latents and not args.cache_dir:
        raise ValueError("--cache-latents needs --cache-dir (where the latents are stored)")
    if args.cache_inpaint < 0 or (args.cache_inpaint and not args.cache_latents):
        raise ValueError(f"--cache-inpaint {args.cache_inpaint}: give a count >= 1 together with --cache-latents")
    if args.cache_dir:
        check_output_folder("--cache-dir", args.cache_dir)
    if args.validation_image:
        if info.variant != "InP":
            raise ValueError("--validation-image needs an InP model")
        check_input("--validation-image", args.validation_image, "image")
    if args.train_mode == "inpaint" and info.variant != "InP":
        raise ValueError(f"--train-mode inpaint needs an InP model; {root} is {info.variant}")
    skeleton = transformer_skeleton(info)
    targets = lora_targets(skeleton, args.lora_targets) if args.mode == "lora" else []  # ValueError: none match
    _check_resources(args, procs, info, vae_info, [skeleton.get_submodule(t) for t in targets])
    return root, info


def _check_resources(args, procs: Processes, info, vae_info, lora_layers: list[nn.Module]) -> None:
    """The training clips and the validation videos fit the device's memory (lower bounds, numbers printed);
    --output has room for a checkpoint and the final output."""
    if args.validation_prompt:
        flags = {"frames": "--validation-frames", "height": "--validation-height", "width": "--validation-width"}
        size = (args.validation_frames, args.validation_height, args.validation_width)
        check_video_size(*size, vae_info.config, flags)
        hidden = info.config.num_attention_heads * info.config.attention_head_dim
        needed = generation_memory_bytes(*size, vae_info.config, hidden)
        what = f"a {size[0]}-frame {size[2]}x{size[1]} validation video"
        check_memory(needed, what, procs.device, "--validation-frames / --validation-height / --validation-width")
    dtype = DTYPES[args.dtype or ("bf16" if procs.device.type == "cuda" else "fp32")]
    samples = args.micro_batch or args.batch_size // procs.world
    shards = procs.world if args.fsdp else 1
    needed = training_memory_bytes(info, args.mode, dtype, clip_token_budget(args), samples, shards)
    what = f"{args.mode} training of a {info.num_params:,}-parameter transformer on clips of up to "
    what += f"{clip_token_budget(args):,} tokens, {samples} a forward pass,"
    check_memory(needed, what, procs.device, "--resolutions / --frames / --token-budget / --micro-batch")
    trained = sum(args.rank * (m.in_features + m.out_features) for m in lora_layers) if lora_layers else info.num_params
    # A checkpoint holds the trained numbers and Adam's two moments in float32; the final output one more copy.
    _check_output_folder(args, needed_bytes=trained * 4 * 4)


def clip_token_budget(args) -> int:
    """Most transformer tokens per training clip: --token-budget, else --frames at the largest resolution."""
    return args.token_budget or ((args.frames - 1) // 4 + 1) * (max(args.resolutions) // 16) ** 2


def _check_output_folder(args, needed_bytes: int) -> None:
    """``--output`` can be written with room for a checkpoint; a fresh run never replaces an earlier run's files."""
    output = check_output_folder("--output", args.output, needed_bytes)
    if args.resume:
        resolve_resume(output, args.resume)  # ValueError when there is no such checkpoint
        return
    # Trained weights only: the logs and settings a run that failed before its first checkpoint left are replaced.
    earlier = [output / f"{args.name}.safetensors", output / "transformer", *list_checkpoints(output)]
    refuse_earlier_outputs(args, output, earlier)


def _fingerprint(run: Run) -> dict:
    args = run.args
    return {
        "model": str(run.root.resolve()),
        "mode": args.mode,
        "rank": args.rank if not run.full else None,
        "alpha": args.alpha if not run.full else None,
        "lora_targets": args.lora_targets,
        "data": str(Path(args.data).resolve()),
        "samples": [s.index for s in run.samples],
        "buckets": digest(run.buckets),
        "batch_size": args.batch_size,
        "seed": args.seed,
        "train_mode": args.train_mode,
        "caption_dropout": args.caption_dropout,
        "dtype": args.dtype,
        "lr": args.lr,
        "lr_schedule": [args.lr_scheduler, args.warmup_steps, args.max_steps if args.lr_scheduler != "constant" else 0],
    }


def _load_models(run: Run, resume: Path | None) -> None:
    """VAE, transformer (+ LoRA network), wrapped for the process group; weights from ``resume`` if given."""
    from ..loading import load_transformer, load_vae
    from ..pipeline import model_inputs as pipeline_inputs

    args, procs = run.args, run.procs
    vae_dtype = torch.float32 if run.dtype == torch.float16 else run.dtype  # fp16 overflows in the VAE
    run.vae = load_vae(run.root, dtype=vae_dtype, device=procs.device).requires_grad_(False)
    source = resume if (resume and run.full) else run.root
    transformer = load_transformer(source, dtype=torch.float32 if run.full else run.dtype, device=procs.device)
    transformer.gradient_checkpointing = args.gradient_checkpointing
    run.inpaint_channels, _ = pipeline_inputs(transformer, run.vae.config.latent_channels)
    run.inpaint = args.train_mode == "inpaint" or (args.train_mode == "auto" and run.inpaint_channels > 0)
    if run.full:
        transformer.requires_grad_(True)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        run.network = LoraNetwork(transformer, args.rank, args.alpha, args.lora_targets, generator).to(procs.device)
        if resume:
            run.network.load_state_dict(load_file(resume / "lora.safetensors"))
        run.network.attach(transformer)
    run.transformer = transformer
    model = container = TrainedModel(transformer, run.network)
    if procs.world > 1 and args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in transformer.transformer_blocks:
            fully_shard(block)
        fully_shard(transformer)
    elif procs.world > 1:
        ids = [procs.device.index] if procs.device.type == "cuda" else None
        # find_unused_parameters: when every block is dual-stream (the micro model), the last block's text-stream
        # output feeds nothing, so its weights never get a gradient and DDP would wait for them forever.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True
        )
    run.model = model
    # Named after wrapping: fully_shard replaces the parameters by sharded ones.
    run.params = [(n, p) for n, p in container.named_parameters() if p.requires_grad]
    params = [p for _, p in run.params]
    run.optimizer = torch.optim.AdamW(
        params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, eps=args.adam_eps
    )
    if run.dtype == torch.float16:
        run.scaler = torch.amp.GradScaler(procs.device.type)


def _optimizer_state(run: Run) -> dict:
    """The optimizer state keyed by parameter name (gathered to rank 0 under FSDP)."""
    if run.args.fsdp and run.procs.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(run.model, run.optimizer, options=options)
    state = run.optimizer.state_dict()
    names = [n for n, _ in run.params]
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]],
    }


def _load_optimizer_state(run: Run, state: dict) -> None:
    if run.args.fsdp and run.procs.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(run.model, run.optimizer, state, options=options)
        return
    index = {n: i for i, (n, _) in enumerate(run.params)}
    missing = set(index) - set(g for group in state["param_groups"] for g in group["params"])
    if missing:
        raise ValueError(
            f"the checkpoint's optimizer lacks {len(missing)} trained parameters, e.g. {sorted(missing)[:2]}"
        )
    run.optimizer.load_state_dict(
        {
            "state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]],
        }
    )


def _full_state_dict(run: Run) -> dict[str, torch.Tensor]:
    """The transformer's weights on rank 0 (gathered under FSDP)."""
    if run.args.fsdp and run.procs.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(run.transformer, options=options)
    return run.transformer.state_dict()


def _transformer_config(run: Run) -> dict:
    from ..loading import resolve_files

    config = resolve_files(run.root, "transformer")[1]
    return config or {k: v for k, v in dataclasses.asdict(run.transformer.config).items() if k != "compat"}


def _write_weights(run: Run, folder: Path, step: int, dtype: torch.dtype, state_dict=None) -> None:
    """The trained weights into ``folder``: lora.safetensors or transformer/ (rank 0)."""
    if run.full:
        write_transformer_folder(
            folder / "transformer", state_dict, _transformer_config(run), dtype, int(run.args.shard_size * 2**30)
        )
    else:
        save_lora(folder / "lora.safetensors", run.network.layers(), metadata=run.metadata(step), dtype=dtype)


def save_checkpoint(run: Run, step: int, epoch: int, fingerprint: dict, loss_log: LossLog | None) -> None:
    """A checkpoint of ``step`` (every process takes part; rank 0 writes)."""
    optimizer_state = _optimizer_state(run)
    state_dict = _full_state_dict(run) if run.full else None
    rngs = run.procs.gather(rng_state())
    if run.procs.main:
        state = {"step": step, "epoch": epoch, "world_size": run.procs.world, "fingerprint": fingerprint}
        if run.scaler:
            state["scaler"] = run.scaler.state_dict()
        write_checkpoint(
            checkpoint_dir(run.output, step),
            lambda tmp: _write_weights(run, tmp, step, torch.float32, state_dict),
            optimizer_state,
            state,
            rngs,
        )
        prune_checkpoints(run.output, run.args.keep_checkpoints)
        plot_losses(loss_log.entries, run.output / "loss.png")
    run.procs.barrier()


def validate(run: Run, step: int) -> None:
    """Validation videos of the model as trained so far, through the generation pipeline."""
    from ..pipeline import generate
    from ..video_io import read_image, write_video

    args, procs = run.args, run.procs
    fsdp = args.fsdp and procs.world > 1
    if not (procs.main or fsdp):  # under FSDP every process must run the sharded forward
        return
    sampler_name, _, guidance = sampling.DEFAULTS[run.version]
    image = read_image(args.validation_image) if args.validation_image else None

    def stage(name, model):
        return run.autocast() if name == "transformer" else contextlib.nullcontext()

    for i, prompt in enumerate(args.validation_prompt):
        frames = generate(
            run.transformer,
            run.vae,
            PromptPair(run.text.get([prompt]), run.text.get([""])),
            sampling.make_sampler(sampler_name, run.version, args.validation_steps),
            frames=args.validation_frames,
            height=args.validation_height,
            width=args.validation_width,
            guidance=guidance,
            seed=args.seed,
            start_image=image,
            device=procs.device,
            stage=stage,
        )
        if procs.main:
            meta = {"prompt": prompt, "step": step, "model": str(run.root), "seed": args.seed}
            write_video(run.output / "validation" / f"step-{step:06d}-{i}.mp4", frames, metadata=meta)


def _final_outputs(run: Run, step: int) -> Path:
    """The trained LoRA file (official keys) or transformer/ folder in the save dtype; returns its path."""
    save_dtype = DTYPES[run.args.save_dtype] if run.args.save_dtype else run.dtype
    state_dict = _full_state_dict(run) if run.full else None
    target = run.output / ("transformer" if run.full else f"{run.args.name}.safetensors")
    if run.procs.main:
        if run.full:
            with atomic_dir(target) as tmp:
                write_transformer_folder(
                    tmp, state_dict, _transformer_config(run), save_dtype, int(run.args.shard_size * 2**30)
                )
            _link_base_parts(run)
        else:
            save_lora(target, run.network.layers(), metadata=run.metadata(step), dtype=save_dtype)
    run.procs.barrier()
    return target


def _link_base_parts(run: Run) -> None:
    """Make a full fine-tuning output a model folder ``generate --model`` loads: link the base model's other parts
    (VAE, text encoders, tokenizers, settings) beside the trained transformer/, never copying gigabytes."""
    from ..loading import PIPELINE_PARTS
    from ..micro import DEFAULTS_FILE

    for part in ["vae", *PIPELINE_PARTS.get(run.version, []), DEFAULTS_FILE]:
        source, link = (run.root / part).resolve(), run.output / part
        if not source.exists() or link.exists() or link.is_symlink():
            continue
        try:
            os.symlink(source, link, target_is_directory=source.is_dir())
        except OSError as e:  # e.g. Windows without the right to make links: generate's error says what to do
            run.log(f"could not link {source} into {run.output} ({e.strerror}); link or copy it there to generate")


@dataclass
class TrainResult:
    losses: dict[int, float]  # step -> loss of the steps this call trained
    output: Path  # the LoRA file or transformer/ folder
    steps: int


def run_training(args, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train as ``args`` say (see ``add_train_arguments``); resumes from ``args.resume`` if set."""
    return run_in_processes(args.device, lambda procs: _train(args, procs, on_step))


def _train(args, procs: Processes, on_step) -> TrainResult:
    from tqdm import tqdm

    log = print if procs.main else (lambda *a, **k: None)
    root, info = _check_inputs(args, procs)
    output = Path(args.output).expanduser()
    resume = resolve_resume(output, args.resume) if args.resume else None
    device_default = "bf16" if procs.device.type == "cuda" else "fp32"
    dtype = DTYPES[args.dtype or device_default]
    micro = f", {args.micro_batch} a forward pass" if args.micro_batch else ""
    log(
        f"{procs.world} process{'es' if procs.world > 1 else ''} on {procs.device.type}; global batch "
        f"{args.batch_size} ({args.batch_size // procs.world} a process{micro})"
    )
    if unlaunched_processes():
        log(
            "warning: accelerate launch asked for several processes but started this one alone (on the CPU it "
            "needs --multi_cpu); this run trains on 1 process. For several, use accelerate launch --multi_cpu / "
            "--multi_gpu or torchrun --nproc_per_node N -m easyanimate_core.cli train ..."
        )
    probes = ProbeCache(output / PROBE_CACHE)
    started = time.perf_counter()
    with tqdm(desc="checking the dataset", unit="file", disable=not procs.main, leave=False) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        data = (args.data, args.data_root, args.min_frames, args.skip_bad_samples, log)
        samples = load_dataset(*data, progress=progress, probes=probes)
    log(f"checked {len(samples)} samples in {time.perf_counter() - started:.1f} s ({probes.probed} files probed)")
    if procs.main and probes.probed:
        probes.save()
    resolutions = tuple(args.resolutions)
    rule = BucketRule(resolutions, args.frames, clip_token_budget(args))
    buckets = [rule.bucket(s) for s in samples]
    log(f"{len(samples)} samples in buckets (frames x height x width):\n{describe_buckets(buckets)}")
    run = Run(args, procs, root, output, info.version, info.variant, samples, buckets, dtype, log=log)
    fingerprint = _fingerprint(run)

    start = start_run(args, procs, output, resume, fingerprint, STRICT_KEYS, log)
    start_step, saved = start.step, start.saved

    prompts = [s.text for s in samples] + list(args.validation_prompt)
    cache = Path(args.cache_dir) if args.cache_dir else None
    run.text = TextEmbeddings(root, info.version, prompts, dtype, procs, cache, log)
    _load_models(run, resume)
    if resume:
        _load_optimizer_state(run, start.optimizer_state)
        if run.scaler and "scaler" in saved:
            run.scaler.load_state_dict(saved["scaler"])
    latent_files = build_latent_cache(run) if args.cache_latents else None
    inpaint_files = build_inpaint_cache(run) if args.cache_inpaint and run.inpaint else None

    plan, epochs = step_plan(buckets, args.batch_size, args.seed, args.max_steps)
    loader = torch.utils.data.DataLoader(
        StepExamples(run, plan, latent_files, inpaint_files),
        batch_size=None,
        sampler=range(start_step, args.max_steps),
        num_workers=args.workers,
        collate_fn=as_is,
    )
    if resume and start.rng is not None and saved["world_size"] == procs.world:
        set_rng_state(*start.rng)
    loss_log = LossLog(output / "loss.jsonl", start_step if resume else None) if procs.main else None
    losses: dict[int, float] = {}
    bar = tqdm(total=args.max_steps, initial=start_step, desc="training", unit="step", disable=not procs.main)
    step = start_step
    try:
        with StopSignals(log) as signals:
            for index, examples in zip(range(start_step, args.max_steps), loader, strict=True):
                lr = args.lr * lr_factor(index, args.max_steps, args.warmup_steps, args.lr_scheduler)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                local = train_step(run, index, examples)
                if run.scaler:
                    run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_([p for _, p in run.params], args.max_grad_norm)
                if run.scaler:
                    run.scaler.step(run.optimizer)
                    run.scaler.update()
                else:
                    run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                loss = procs.total(local) / args.batch_size
                if not math.isfinite(loss):
                    raise ValueError(f"the loss became {loss} at step {index + 1}; lower --lr or use --dtype bf16/fp32")
                step = index + 1
                losses[step] = loss
                if loss_log:
                    loss_log.append({"step": step, "loss": loss, "lr": lr, "epoch": epochs[index]})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if on_step:
                    on_step(step, loss)
                stopping = procs.any(signals.received is not None)  # every process stops at the same step
                if step % args.checkpoint_every == 0 or step == args.max_steps or stopping:
                    save_checkpoint(run, step, epochs[index], fingerprint, loss_log)
                if stopping and step < args.max_steps:
                    raise TrainingStopped(step, output, signals.received or "a signal", resume_command(args))
                if args.validation_prompt and args.validation_every and step % args.validation_every == 0:
                    validate(run, step)
    except KeyboardInterrupt as e:
        raise TrainingInterrupted(step, output, resume_command(args)) from e
    finally:
        bar.close()
    result = _final_outputs(run, step)
    log(f"wrote {result} after {step} steps; loss log {output / 'loss.jsonl'}, plot {output / 'loss.png'}")
    return TrainResult(losses, result, step)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``easyanimate train``."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="model folder (transformer/, vae/, text encoder(s))")
    g.add_argument("--data", required=True, help="metadata JSON: a list of {file_path, text, type: video|image}")
    g.add_argument("--data-root", help="folder that relative file_path values start from (default: the JSON's)")
    g.add_argument("--output", required=True, help="output folder (LoRA / transformer, checkpoints, logs)")
    g.add_argument("--name", default="easyanimate_lora", help="file name of the trained LoRA (without .safetensors)")
    g.add_argument("--skip-bad-samples", action="store_true", help="train without the entries that fail the checks")
    g.add_argument("--min-frames", type=int, default=5, help="videos with fewer frames are bad samples")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes reading the clips")

    g = p.add_argument_group("what to train")
    g.add_argument("--mode", choices=("lora", "full"), default="lora")
    g.add_argument("--rank", type=int, default=128, help="LoRA rank (official default 128)")
    g.add_argument("--alpha", type=float, default=64.0, help="LoRA alpha; scale alpha/rank (official default 64)")
    g.add_argument(
        "--lora-targets", nargs="+", help="fnmatch patterns of Linear layer paths (default: all, as official)"
    )
    g.add_argument(
        "--train-mode",
        choices=("auto", "normal", "inpaint"),
        default="auto",
        help="inpaint: random masks for image-to-video (InP models, the default for them); normal: text only",
    )
    g.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty prompts (for CFG)")

    g = p.add_argument_group("buckets")
    g.add_argument("--resolutions", type=int, nargs="+", default=[512], help="base sides of the aspect buckets")
    g.add_argument("--frames", type=int, default=49, help="most frames per video clip (4k+1)")
    g.add_argument("--stride", type=int, default=3, help="frame stride of video clips")
    g.add_argument(
        "--token-budget",
        type=int,
        help="most transformer tokens per clip (default: --frames at the largest resolution)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=1, help="global batch (over all processes)")
    g.add_argument(
        "--micro-batch",
        type=int,
        help="samples per forward pass (gradient accumulation); default: the whole per-process batch",
    )
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULES, default="constant")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=5e-2, help="AdamW weight decay (released script: 5e-2)")
    g.add_argument("--adam-eps", type=float, default=1e-10, help="AdamW epsilon (released script: 1e-10)")
    g.add_argument("--max-grad-norm", type=float, default=0.05, help="gradient clipping (released script: 0.05)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--dtype", choices=list(DTYPES), help="training dtype (default: bf16 on a GPU, fp32 on the CPU)")
    g.add_argument("--save-dtype", choices=list(DTYPES), help="dtype of the final output (default: --dtype)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    g.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    g.add_argument("--fsdp", action="store_true", help="full mode on several GPUs: shard weights (FSDP2)")
    g.add_argument("--shard-size", type=float, default=5.0, help="GiB per safetensors shard in full mode")

    g = p.add_argument_group("caches, checkpoints, validation")
    g.add_argument(
        "--cache-dir", help="store prompt embeddings (and with --cache-latents, latents) here (default: none: no cache)"
    )
    g.add_argument("--cache-latents", action="store_true", help="encode each sample's clip once (a fixed clip)")
    g.add_argument(
        "--cache-inpaint",
        type=int,
        default=0,
        metavar="N",
        help="with --cache-latents in inpaint mode: draw N masks per sample once and cache their masked-clip latents "
        "(each step picks one; no VAE work while training); 0: a new mask, encoded, every step",
    )
    g.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=int, help="keep only the newest N checkpoints (default: keep all)")
    g.add_argument("--resume", help="'latest' or a checkpoint folder (default: start a new run)")
    g.add_argument("--validation-prompt", action="append", default=[], help="prompt of a validation video (repeat)")
    g.add_argument("--validation-every", type=int, default=0, help="steps between validation videos (0: never)")
    g.add_argument("--validation-image", help="start image of the validation videos (InP models)")
    g.add_argument("--validation-frames", type=int, default=49)
    g.add_argument("--validation-height", type=int, default=384)
    g.add_argument("--validation-width", type=int, default=672)
    g.add_argument("--validation-steps", type=int, default=25)


def train_main(args) -> int:
    """Run ``easyanimate train``; returns the exit code (errors are printed, not raised)."""
    return exit_code(run_training, args)
