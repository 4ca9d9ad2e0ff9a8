"""The micro model's training recipe: regenerates the data and reproduces the weights from one seed.

    python bench/train_micro.py --work /tmp/micro-work                 # every stage, in order
    python bench/train_micro.py --work /tmp/micro-work --minutes 18    # stop after ~18 min; run again to go on

Stages (each is skipped when its output exists, so the script continues where a run stopped):
    init   untrained model folder: micro T2V transformer, VAE, frozen word-level Qwen2-VL text encoder
    vae    python -m easyanimate_core.micro.train_vae (procedural clips rendered on the fly), then its
           scaling factor (1 / latent std)
    data   the training set: every non-held-out caption combination, PER_COMBINATION clips each
    t2v    easyanimate train --mode full on the T2V transformer (latents cached once)
    inp    the trained T2V transformer widened to InP (zero weights on the 17 inpaint channels), then
           easyanimate train --mode full in inpaint mode (text-, image-, start/end-to-video masks)
    ship   easyanimate_core/micro_model/: the InP transformer (fp16), VAE, text encoder, tokenizer
    eval   bench/eval_micro.py on held-out prompts (JSON next to the work folder's outputs)

Both trainers resume exactly (a batch, its noise and timesteps depend only on the seed and the step), so
a recipe run in several pieces gives the same weights as one run on the same machine and torch build.
Training runs single-threaded (OMP_NUM_THREADS=1) unless --threads says otherwise.
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
from easyanimate_core.micro import data, model, train_vae  # noqa: E402

STAGES = ("init", "vae", "data", "t2v", "inp", "ship", "eval")
PER_COMBINATION = 4  # clips per caption combination: 384 combinations -> 1536 videos
VAE = {"steps": 8000, "batch": 4, "frames": 5, "crop": 32, "full-from": 7200, "full-batch": 2, "full-frames": 9}
# Shared by both transformer runs (the InP run starts from the T2V weights).
TRANSFORMER = [
    "--resolutions", "64", "--frames", "17", "--stride", "1", "--batch-size", "16", "--lr-scheduler", "constant",
    "--warmup-steps", "100", "--weight-decay", "0", "--max-grad-norm", "1.0", "--caption-dropout", "0.1",
    "--dtype", "fp32", "--checkpoint-every", "25", "--keep-checkpoints", "2",
]  # fmt: skip
T2V = {"steps": 3000, "lr": "3e-4"}
INP = {"steps": 1000, "lr": "1e-4"}
SHIP = REPO / "easyanimate_core" / "micro_model"


class OutOfTime(Exception):
    """The --minutes budget of this invocation is spent; running the script again continues."""


class Recipe:
    """The stages over one work folder."""

    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

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
            model.write_initial_checkpoint(self.work / "init", "T2V", seed=self.args.seed)

    def vae(self) -> None:
        run = self.work / "vae_run"
        if (run / "vae").is_dir():
            return
        argv = ["--model", str(self.work / "init"), "--output", str(run), "--seed", str(self.args.seed)]
        argv += ["--threads", str(self.args.threads)] + [f"--{k}={v}" for k, v in VAE.items()]
        limit = self.minutes_left()
        if limit:
            argv += ["--minutes", f"{limit - 0.5:.1f}"]
        train_vae.main(argv)
        state = json.loads((run / "state" / "state.json").read_text())
        if state["step"] < VAE["steps"]:
            raise OutOfTime
        train_vae.finish(self.work / "init", run)

    def data(self) -> None:
        if not (self.work / "data" / "metadata.json").is_file():
            data.write_dataset(self.work / "data", data.training_attributes(), PER_COMBINATION, seed=self.args.seed)

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

    def train_transformer(self, name: str, base: Path, settings: dict) -> Path:
        """Run ``easyanimate train --mode full`` into work/<name>, resuming; returns its transformer/ folder."""
        output = self.work / name
        if (output / "transformer").is_dir():
            return output / "transformer"
        argv = [sys.executable, "-m", "easyanimate_core.cli", "train", "--mode", "full", "--model", str(base)]
        argv += ["--data", str(self.work / "data" / "metadata.json"), "--output", str(output), *TRANSFORMER]
        argv += ["--max-steps", str(settings["steps"]), "--lr", settings["lr"], "--seed", str(self.args.seed)]
        argv += ["--cache-dir", str(self.work / "cache" / name), "--cache-latents"]
        if (output / "checkpoints").is_dir() and any((output / "checkpoints").iterdir()):
            argv += ["--resume", "latest"]
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
        return output / "transformer"

    def t2v(self) -> None:
        self.train_transformer("t2v_run", self.base("base_t2v", None, None), T2V)

    def inp(self) -> None:
        from safetensors.torch import load_file

        t2v = self.work / "t2v_run" / "transformer"
        state = model.inpaint_from_text_to_video(load_file(t2v / model.WEIGHTS_NAME))
        config = model.transformer_json(model.transformer_config("InP"))
        self.train_transformer("inp_run", self.base("base_inp", state, config), INP)

    def ship(self) -> None:
        from safetensors.torch import load_file

        target = Path(self.args.ship_to)
        trained = self.work / "inp_run" / "transformer"
        for part, source in (("text_encoder", "init"), ("tokenizer", "init"), ("vae", "vae_run")):
            with atomic_dir(target / part) as tmp:
                shutil.copytree(self.work / source / part, tmp, dirs_exist_ok=True)
        config = json.loads((trained / "config.json").read_text())
        with atomic_dir(target / "transformer") as tmp:
            model.save_model_folder(tmp, load_file(trained / model.WEIGHTS_NAME), config, torch.float16)
        print(f"shipped {target}")

    def eval(self) -> None:
        sys.path.insert(0, str(REPO / "bench"))
        from eval_micro import main as eval_main

        eval_main(["--model", self.args.ship_to, "--json", str(self.work / "eval.json")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="work folder (data, runs, caches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--minutes", type=float, default=0, help="stop after about this long; run again to continue")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ship-to", default=str(SHIP))
    args = p.parse_args(argv)
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
