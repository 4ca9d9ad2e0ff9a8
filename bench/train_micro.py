"""The micro model's training recipe: regenerates the data and reproduces the weights from one seed.

    python bench/train_micro.py --work /tmp/micro-work                 # every stage, in order
    python bench/train_micro.py --work /tmp/micro-work --minutes 18    # stop after ~18 min; run again to go on
    python bench/train_micro.py --work /tmp/micro-work --set t2v.steps=3000 inp.steps=0   # other settings

Stages (each is skipped when its output exists, so the script continues where a run stopped):
    init   untrained model folder: micro InP transformer, frozen word-level Qwen2-VL text encoder
    vae    the VAE by construction (constructed_vae.py, about a second: no training), its scaling factor
           (1 / latent std) and its reconstruction scores (vae_run/scores.json)
    data   the training set: every non-held-out caption combination, PER_COMBINATION clips each
    t2v    easyanimate train --mode full --train-mode normal on the InP transformer: text-to-video only
           (all-zero inpaint latents, as the released InP models get for text-to-video); latents are
           cached once, so a step costs one transformer pass
    inp    the text-to-video run goes on in inpaint mode: random start / start-end / box / frame masks and
           20% text-to-video; the masked clips' latents are cached once per drawn mask (--cache-inpaint)
    wrap   the inpaint model fine-tuned (inpaint mode, fresh optimizer) on clips of the wrapping world
           (data.Clip.wrap): a shape leaving one edge comes back at the other, so a long clip can keep one shape
           moving one way; then the same run goes on at a lower rate ("settle"). The stages before it train on the
           bounded world, as the shipped weights were made
    lora   easyanimate train --mode lora --train-mode normal on the InP model: clips of a colour no base caption
           names (cyan)
    ship   easyanimate_core/micro_model/: the InP transformer (fp16), VAE, text encoder, tokenizer, LoRA
    eval   bench/eval_micro.py on held-out prompts (JSON next to the work folder's outputs)

The trainer resumes exactly (a batch, its noise and timesteps depend only on the seed and the step), so
a recipe run in several pieces gives the same weights as one run on the same machine and torch build.
The transformer stages run min(2, cores) processes under torchrun (--processes), one thread each (--threads): on
2 cores that trains ~1.8x faster than one process, and one thread per process is 3-4x faster than two when other
work shares the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from easyanimate_core.atomic import atomic_dir  # noqa: E402
from easyanimate_core.micro import constructed_vae, data, model, train_vae  # noqa: E402
from easyanimate_core.training.files import STATE_FILE, list_checkpoints  # noqa: E402

STAGES = ("init", "vae", "data", "t2v", "inp", "wrap", "lora", "ship", "eval")
PER_COMBINATION = 4  # clips per caption combination: 384 combinations -> 1536 videos
# The model's shape: latent pixels per transformer token side (model.PATCH_SIZE unless set).
INIT = {"patch": model.PATCH_SIZE}
# Shared by the transformer runs (the InP model and its LoRA).
TRANSFORMER = [
    "--resolutions", "64", "--frames", "17", "--stride", "1", "--batch-size", "32", "--lr-scheduler", "constant",
    "--warmup-steps", "100", "--weight-decay", "0", "--max-grad-norm", "1.0", "--caption-dropout", "0.1",
    "--dtype", "fp32", "--checkpoint-every", "100", "--keep-checkpoints", "2",
]  # fmt: skip
# Constant rates after warm-up: a run extended to more steps equals one trained to that many from the start.
# Steps as the shipped weights were trained (MODEL_CARD.md): direction reached 87.5% at 3200 steps.
T2V = {"steps": 3625, "lr": "3e-4"}
# "masks": --cache-inpaint (masks drawn once per clip and their latents cached: no VAE work per step).
INP = {"steps": 1800, "lr": "1e-4", "masks": 2}
# Fine-tuning on the wrapping world (a new data set, so a new latent cache and optimizer), then "settle" more steps
# at a lower rate continuing the same run: at the constant rate alone the scores of checkpoints 3000 steps apart
# moved by up to 9 points (MODEL_CARD.md, training log).
WRAP = {"steps": 7500, "lr": "2e-4", "masks": 2, "settle": 1500, "settle_lr": "5e-5"}
SHIP = REPO / "easyanimate_core" / "micro_model"
LORA_CONCEPT = "cyan"  # data.EXTRA_COLOURS: in the vocabulary, never in a base caption
LORA_NAME = f"micro_{LORA_CONCEPT}"
LORA_PER_COMBINATION = 2  # 96 cyan combinations -> 192 clips
# Text-to-video ("normal") training: the concept is a caption word, and a step costs one transformer pass on
# cached latents (inpaint mode encodes each masked clip: 8x slower on a CPU); "inpaint" to train image-to-video too.
# The shipped LoRA: 400 steps at 1e-3, then resumed to 1000 at 2e-3 (cyan 27% after the first 400).
LORA = {"steps": 1000, "lr": "2e-3", "rank": 16, "train-mode": "normal"}
# --smoke: every stage at a few steps on a few clips, to check a machine runs the recipe (minutes, not hours).
SMOKE = {
    "clips": 12,
    "t2v": {**T2V, "steps": 3},
    "inp": {**INP, "steps": 3, "masks": 2},
    "wrap": {**WRAP, "steps": 3, "masks": 2, "settle": 2},
    "batch": "2",
}


class OutOfTime(Exception):
    """The --minutes budget of this invocation is spent; running the script again continues."""


class Recipe:
    """The stages over one work folder."""

    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.init_settings, self.t2v_settings, self.inp_settings = dict(INIT), dict(T2V), dict(INP)
        self.wrap_settings = dict(WRAP)
        self.lora_settings = dict(LORA)
        self.transformer_args = list(TRANSFORMER)
        if args.smoke:
            self.t2v_settings = dict(SMOKE["t2v"])
            self.inp_settings = dict(SMOKE["inp"])
            self.wrap_settings = dict(SMOKE["wrap"])
            self.lora_settings = {**LORA, "steps": SMOKE["inp"]["steps"]}
            batch = self.transformer_args.index("--batch-size") + 1
            self.transformer_args[batch] = SMOKE["batch"]
        stages = {"init": self.init_settings, "t2v": self.t2v_settings, "inp": self.inp_settings}
        stages["wrap"] = self.wrap_settings
        stages["lora"] = self.lora_settings
        for override in args.set:
            stage, _, rest = override.partition(".")
            key, _, value = rest.partition("=")
            settings = stages.get(stage)
            if settings is None or key not in settings or not value:
                raise SystemExit(
                    f"--set {override!r}: expected STAGE.KEY=VALUE with STAGE one of {', '.join(stages)} "
                    f"and KEY one of its settings ({', '.join(settings or [])})"
                )
            settings[key] = type(settings[key])(value)

    def training_attributes(self) -> list[data.Attributes]:
        attributes = data.training_attributes()
        return attributes[:: len(attributes) // SMOKE["clips"]] if self.args.smoke else attributes

    def minutes_left(self) -> float:
        if self.deadline is None:
            return 0.0  # no limit
        left = (self.deadline - time.monotonic()) / 60
        if left < 1:
            raise OutOfTime
        return left

    # ---- stages ---------------------------------------------------------------------------------

    def init(self) -> None:
        if not (self.work / "init").is_dir():
            patch = self.init_settings["patch"]
            model.write_initial_checkpoint(self.work / "init", "InP", seed=self.args.seed, patch_size=patch)

    def vae(self) -> None:
        """The VAE by construction (constructed_vae.py: no training), and its reconstruction scores."""
        run = self.work / "vae_run"
        if (run / "vae").is_dir():
            return
        with atomic_dir(run / "vae") as tmp:
            constructed_vae.write_vae_folder(tmp)
        clips = 2 if self.args.smoke else 32
        scores = train_vae.reconstruction_scores(run / "vae", clips)
        (run / "scores.json").write_text(json.dumps(scores) + "\n")
        print("VAE reconstructions:", json.dumps(scores), flush=True)

    def write_data(self, name: str, attributes, per_combination: int, seed: int, wrap: bool) -> None:
        """work/<name>: PNG clips of ``attributes`` and their dataset JSON (kept if written already)."""
        if not (self.work / name / "metadata.json").is_file():
            data.write_dataset(self.work / name, attributes, per_combination, seed, video_format="png", wrap=wrap)

    def data(self) -> None:
        """The bounded world's training set (the first stages'); ``wrap`` writes the wrapping world's."""
        self.write_data("data", self.training_attributes(), PER_COMBINATION, self.args.seed, wrap=False)

    def base_from_run(self, name: str, run: Path) -> Path:
        """A model folder ``name`` (as ``base``) whose transformer is ``run``'s trained one."""
        from safetensors.torch import load_file

        trained = run / "transformer"
        config = json.loads((trained / "config.json").read_text())
        return self.base(name, load_file(trained / model.WEIGHTS_NAME), config)

    def base(self, name: str, transformer_state: dict | None, config: dict | None) -> Path:
        """A model folder ``name``: init's text encoder and tokenizer, the trained VAE, and a transformer."""
        root = self.work / name
        if root.is_dir():
            return root
        with atomic_dir(root) as tmp:
            for part in ("text_encoder", "tokenizer"):
                shutil.copytree(self.work / "init" / part, tmp / part)
            shutil.copytree(self.work / "vae_run" / "vae", tmp / "vae")
            if transformer_state is None:
                shutil.copytree(self.work / "init" / "transformer", tmp / "transformer")
            else:
                model.save_model_folder(tmp / "transformer", transformer_state, config, torch.float32)
        return root

    def train_transformer(
        self,
        name: str,
        base: Path,
        settings: dict,
        data_name: str = "data",
        extra=(),
        continue_run: str | None = None,
    ) -> Path:
        """Run ``easyanimate train`` (``--mode full`` unless ``extra`` says otherwise) into work/<name>,
        resuming; returns the run folder. ``continue_run``: start from that run's last checkpoint (its weights,
        optimizer and step count, its latent cache) and train ``settings["steps"]`` more steps."""
        output = self.work / name
        if (output / "done").is_file():
            return output
        steps, cache = settings["steps"], name
        start = None
        if continue_run:
            start = list_checkpoints(self.work / continue_run)[-1]
            steps += json.loads((start / STATE_FILE).read_text())["step"]
            cache = continue_run
        launcher = [sys.executable]
        if self.args.processes > 1:  # data parallel, one thread each: on 2 cores ~1.8x the steps of one process
            torchrun = str(Path(sys.executable).parent / "torchrun")
            launcher = [torchrun, "--standalone", "--nproc_per_node", str(self.args.processes)]
        argv = [*launcher, "-m", "easyanimate_core.cli", "train", "--mode", "full", "--model", str(base)]
        argv += ["--data", str(self.work / data_name / "metadata.json"), "--output", str(output)]
        argv += [*self.transformer_args, *extra]
        argv += ["--max-steps", str(steps), "--lr", settings["lr"], "--seed", str(self.args.seed)]
        argv += ["--cache-dir", str(self.work / "cache" / cache), "--cache-latents"]
        if list_checkpoints(output):
            argv += ["--resume", "latest"]
        else:
            if output.is_dir():  # stopped before its first checkpoint (e.g. while caching latents): start again
                shutil.rmtree(output)
            if start is not None:
                argv += ["--resume", str(start)]
        print("+", " ".join(argv), flush=True)
        process = subprocess.Popen(argv, env=self.env)
        try:
            limit = self.minutes_left()
            code = process.wait(timeout=limit * 60 - 30 if limit else None)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)  # the CLI stops cleanly; the last checkpoint is kept
            process.wait()
            raise OutOfTime from None
        if code != 0:
            raise SystemExit(f"easyanimate train failed with exit code {code}")
        (output / "done").write_text("")
        return output

    def t2v(self) -> None:
        extra = ["--train-mode", "normal"]
        self.train_transformer("t2v_run", self.base("base_t2v", None, None), self.t2v_settings, extra=extra)

    def inp(self) -> None:

        trained = self.work / "t2v_run" / "transformer"
        if self.inp_settings["steps"] == 0:  # no inpaint training: the text-to-video weights go on as they are
            if not (self.work / "inp_run" / "done").is_file():
                with atomic_dir(self.work / "inp_run") as tmp:
                    shutil.copytree(trained, tmp / "transformer")
                    (tmp / "done").write_text("")
            return
        # The text-to-video run goes on in inpaint mode (its latents are cached already; the masked clips' latents
        # are cached once per mask drawn, so a step still costs one transformer pass).
        extra = ["--train-mode", "inpaint", "--cache-inpaint", str(self.inp_settings["masks"])]
        base = self.work / "base_t2v"
        self.train_transformer("inp_run", base, self.inp_settings, extra=extra, continue_run="t2v_run")

    def wrap(self) -> None:
        """The inpaint model fine-tuned on the wrapping world (inpaint mode: 20% of the draws are text-to-video)."""
        self.write_data("data_wrap", self.training_attributes(), PER_COMBINATION, self.args.seed + 1, wrap=True)
        base = self.base_from_run("base_wrap", self.work / "inp_run")
        settings = self.wrap_settings
        extra = ["--train-mode", "inpaint", "--cache-inpaint", str(settings["masks"])]
        self.train_transformer("wrap_run", base, settings, "data_wrap", extra)
        if settings["settle"]:
            settle = {"steps": settings["settle"], "lr": settings["settle_lr"]}
            self.train_transformer("settle_run", base, settle, "data_wrap", extra, continue_run="wrap_run")

    def final_run(self) -> Path:
        """The run whose transformer is shipped: the wrap stage's last."""
        return self.work / ("settle_run" if self.wrap_settings["settle"] else "wrap_run")

    def lora(self) -> None:
        """A LoRA teaching LORA_CONCEPT (a colour no base caption names) on the shipped InP model (wrapping world)."""
        attributes = data.all_attributes([LORA_CONCEPT])
        if self.args.smoke:
            attributes = attributes[:: len(attributes) // SMOKE["clips"]]
        self.write_data("data_lora", attributes, LORA_PER_COMBINATION, self.args.seed, wrap=True)
        base = self.base_from_run("base_lora", self.final_run())
        rank = str(self.lora_settings["rank"])
        extra = ["--mode", "lora", "--rank", rank, "--alpha", rank, "--name", LORA_NAME]
        extra += ["--train-mode", self.lora_settings["train-mode"]]
        self.train_transformer("lora_run", base, self.lora_settings, "data_lora", extra)

    def ship(self) -> None:
        from safetensors.torch import load_file

        target = Path(self.args.ship_to)
        trained = self.final_run() / "transformer"
        for part, source in (("text_encoder", "init"), ("tokenizer", "init"), ("vae", "vae_run")):
            with atomic_dir(target / part) as tmp:
                shutil.copytree(self.work / source / part, tmp, dirs_exist_ok=True)
        config = json.loads((trained / "config.json").read_text())
        with atomic_dir(target / "transformer") as tmp:
            model.save_model_folder(tmp, load_file(trained / model.WEIGHTS_NAME), config, torch.float16)
        model.write_generation_defaults(target)
        (target / "loras").mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.work / "lora_run" / f"{LORA_NAME}.safetensors", target / "loras" / f"{LORA_NAME}.safetensors")
        print(f"shipped {target}")

    def eval(self) -> None:
        sys.path.insert(0, str(REPO / "bench"))
        from eval_micro import main as eval_main

        argv = ["--model", self.args.ship_to, "--json", str(self.work / "eval.json")]
        lora = Path(self.args.ship_to) / "loras" / f"{LORA_NAME}.safetensors"
        argv += ["--lora", str(lora), "--concept", LORA_CONCEPT]
        eval_main(argv + (["--samples", "2", "--steps", "2"] if self.args.smoke else []))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="work folder (data, runs, caches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--minutes", type=float, default=0, help="stop after about this long; run again to continue")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    p.add_argument(
        "--processes",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="transformer stages: processes under torchrun (one per core, up to 2; 1: no torchrun)",
    )
    p.add_argument("--ship-to", default=str(SHIP))
    p.add_argument("--smoke", action="store_true", help="every stage at a few steps: check this machine runs it")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="change a stage's setting, e.g. t2v.steps=3000 vae.frames=9; inp.steps=0 skips inpaint training",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(args)
    recipe.work.mkdir(parents=True, exist_ok=True)
    try:
        for stage in STAGES:
            if stage in args.stages:
                print(f"== {stage}", flush=True)
                getattr(recipe, stage)()
    except OutOfTime:
        print(f"out of time in stage {stage}; run the same command again to continue", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
