"""The CLI refuses bad input before any work and never loses a user's files (issue 16).

* A table of bad inputs for ``generate``, ``train`` and ``info``: each exits with code 2, names its flag, loads
  no model (the weight and text-encoder loaders and the dataset probe are replaced by spies), and leaves the
  output location exactly as it was, a user's file in it included.
* Output safety: frames go into a folder beside what it holds only with --overwrite, replacing only our frames.
* Training: SIGTERM stops at a step boundary with a checkpoint and the resume command, and the resumed run
  ends bit-identical to an uninterrupted one; --keep-checkpoints; a full disk is one message; a full
  fine-tune output generates; outputs honour the umask; dataset probes are cached by size and mtime.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import easyanimate_core.loading as loading_module
import easyanimate_core.text_encoders as text_encoders_module
import easyanimate_core.training.dataset as dataset_module
from easyanimate_core.atomic import atomic_dir, atomic_path, current_umask
from easyanimate_core.cli import build_parser, main
from easyanimate_core.lora import LoraLayer, save_lora
from easyanimate_core.training import trainer as train_module
from easyanimate_core.training.dataset import ProbeCache, load_dataset
from easyanimate_core.video_io import read_video, write_video
from tests.test_train import write_dataset
from tests.tiny_checkpoint import write_tiny_checkpoint

GENERATE = ["--frames", "5", "--height", "32", "--width", "48", "--steps", "2", "--seed", "1"]
TRAIN = ["--resolutions", "32", "--frames", "5", "--stride", "1", "--batch-size", "1", "--rank", "4"]
TRAIN += ["--alpha", "4", "--lr", "1e-3", "--caption-dropout", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny V5.1 InP model, a 4-sample dataset, a LoRA of another model's shapes and other inputs."""
    root = tmp_path_factory.mktemp("safety")
    model = write_tiny_checkpoint(root / "model", "InP")
    data = write_dataset(root / "data")
    (root / "not_an_image.png").write_text("plain text")
    (root / "a_file").write_text("x")
    from easyanimate_core.loading import load_transformer
    from easyanimate_core.lora import LoraNetwork

    layers = LoraNetwork(load_transformer(model), rank=2).layers()
    path, layer = next(iter(layers.items()))
    layers[path] = LoraLayer(torch.zeros(2, 7), layer.up, 2.0)  # a layer 7 wide: another model's
    save_lora(root / "other_model_lora.safetensors", layers)
    torch.save({}, root / "lora.pt")
    (root / "corrupt.safetensors").write_text("not safetensors")
    return {"root": root, "model": model, "data": data}


@pytest.fixture
def no_loading(monkeypatch):
    """Replace every weight loader and the dataset probe by a spy that records and fails the test's run."""
    calls = []

    def spy(name):
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran before the input checks finished")

        return called

    monkeypatch.setattr(loading_module, "_load_weights", spy("weights"))
    monkeypatch.setattr(text_encoders_module, "load_text_encoders", spy("text encoders"))
    monkeypatch.setattr(dataset_module, "probe", spy("dataset probe"))
    return calls


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime (what 'unchanged' is checked against)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def generate_args(ws, out, *extra):
    return ["generate", "--model", str(ws["model"]), "--prompt", "a red band", "--out", str(out), *GENERATE, *extra]


def train_args(ws, out, *extra):
    return ["train", "--model", str(ws["model"]), "--data", str(ws["data"]), "--output", str(out), *TRAIN, *extra]


# (command, extra arguments, text the message must hold: the flag); {root} is the workspace, {out} the output.
BAD_INPUTS = [
    ("generate", ["--frames", "0"], "--frames 0: must be"),
    ("generate", ["--frames", "6"], "--frames: 6 frames: the mag VAE expects 4k\\+1 frames; nearest valid: 5 or 9"),
    ("generate", ["--width", "50"], "--width: width 50 is not a multiple of 16; nearest valid: 48 or 64"),
    ("generate", ["--height", "-16"], "--height -16: must be"),
    ("generate", ["--steps", "0"], "--steps 0"),
    ("generate", ["--fps", "0"], "--fps 0"),
    ("generate", ["--guidance", "nan"], "--guidance nan"),
    ("generate", ["--strength", "1.5"], "--strength 1.5"),
    ("generate", ["--lora-strength", "inf"], "--lora-strength inf"),
    ("generate", ["--shift", "-1"], "--shift -1"),
    ("generate", ["--seed", str(2**70)], "--seed"),
    ("generate", ["--lora", "{root}/missing.safetensors"], "--lora {root}/missing.safetensors: no such file"),
    ("generate", ["--lora", "{root}/lora.pt"], "--lora {root}/lora.pt: not a .safetensors file"),
    (
        "generate",
        ["--lora", "{root}/other_model_lora.safetensors"],
        "--lora .*other_model_lora.safetensors: .*another model",
    ),
    ("generate", ["--image", "{root}/missing.png"], "--image {root}/missing.png: no such file"),
    ("generate", ["--image", "{root}/not_an_image.png"], "--image {root}/not_an_image.png: not a readable image"),
    ("generate", ["--video", "{root}/missing.mp4"], "--video {root}/missing.mp4: no such file"),
    ("generate", ["--width", "16384", "--height", "16384", "--frames", "49"], "--width .*GiB"),
    ("generate", ["--out", "{out}/notes.txt"], "--out .*notes.txt: unknown format"),
    ("generate", ["--out", "{out}/existing.mp4"], "--out .*existing.mp4: the file exists; pass --overwrite"),
    ("generate", ["--out", "{out}"], "--out .*: the folder is not empty"),
    ("generate", ["--out", "{out}/frames", "--overwrite"], "--out .*frames: 00000.png is in the way"),
    (
        "generate",
        ["--out", "{root}/a_file/clip.mp4"],
        "--out .*clip.mp4: .*a_file is a file, so nothing can be written under it",
    ),
    ("generate", ["--model", "{root}/missing"], "--model"),
    ("train", ["--rank", "0"], "--rank 0: must be"),
    ("train", ["--lr", "-1"], "--lr -1.0: must be"),
    ("train", ["--lr", "nan"], "--lr nan"),
    ("train", ["--alpha", "0"], "--alpha 0.0"),
    ("train", ["--batch-size", "0"], "--batch-size 0"),
    ("train", ["--micro-batch", "0"], "--micro-batch 0"),
    ("train", ["--max-steps", "0"], "--max-steps 0"),
    ("train", ["--checkpoint-every", "0"], "--checkpoint-every 0"),
    ("train", ["--keep-checkpoints", "0"], "--keep-checkpoints 0"),
    ("train", ["--caption-dropout", "1.5"], "--caption-dropout 1.5"),
    ("train", ["--warmup-steps", "-1"], "--warmup-steps -1"),
    ("train", ["--weight-decay", "-1"], "--weight-decay -1.0"),
    ("train", ["--max-grad-norm", "0"], "--max-grad-norm 0.0"),
    ("train", ["--frames", "6"], "--frames 6: must be 4k\\+1 \\(1, 5, 9, ... 49\\); nearest valid: 5"),
    ("train", ["--resolutions", "512", "40"], "--resolutions 40: base sides must be multiples of 16"),
    (
        "train",
        ["--validation-prompt", "x", "--validation-every", "1", "--validation-width", "0"],
        "--validation-width 0",
    ),
    ("train", ["--stride", "0"], "--stride 0"),
    ("train", ["--workers", "-1"], "--workers -1"),
    ("train", ["--shard-size", "0"], "--shard-size 0.0"),
    ("train", ["--name", "a/b"], "--name 'a/b'"),
    ("train", ["--validation-prompt", "x"], "--validation-prompt is given but --validation-every is 0"),
    ("train", ["--validation-every", "1"], "--validation-every 1 needs a --validation-prompt"),
    ("train", ["--validation-prompt", "x", "--validation-every", "1", "--validation-steps", "0"], "--validation-steps"),
    (
        "train",
        ["--validation-prompt", "x", "--validation-every", "1", "--validation-frames", "6"],
        "--validation-frames",
    ),
    (
        "train",
        ["--resolutions", "262144", "--frames", "49"],
        "--resolutions / --frames .*: lora training .* needs at least .* GiB",
    ),
    ("train", ["--validation-image", "{root}/not_an_image.png"], "--validation-image .*not a readable image"),
    ("train", ["--lora-targets", "nothing*"], "--lora-targets nothing\\* match no Linear layer"),
    ("train", ["--data", "{root}/missing.json"], "--data {root}/missing.json: no such file"),
    ("train", ["--data-root", "{root}/missing"], "--data-root {root}/missing: no such folder"),
    ("train", ["--model", "{root}/missing"], "--model {root}/missing: no such folder"),
    ("train", ["--output", "{root}/a_file"], "--output {root}/a_file: is a file"),
    ("train", ["--resume", "latest"], "--resume latest: no checkpoint"),
    ("train", ["--cache-latents"], "--cache-latents needs --cache-dir"),
    ("train", ["--name", "existing"], "--output .* holds the outputs of an earlier run \\(existing.safetensors\\)"),
    ("info", ["{root}/missing"], "PATH {root}/missing: no such file"),
    ("info", ["{root}/data"], "{root}/data: no .safetensors weights found in this folder"),
    ("info", ["{root}/corrupt.safetensors"], "{root}/corrupt.safetensors: not a readable safetensors file"),
]


@pytest.mark.parametrize("command, extra, message", BAD_INPUTS, ids=[f"{c} {' '.join(e)}" for c, e, _ in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_flag_before_any_work(ws, tmp_path, capsys, no_loading, command, extra, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes")  # a user's file in the output location
    (out / "existing.mp4").write_bytes(b"a user's video")
    (out / "existing.safetensors").write_bytes(b"a LoRA of an earlier run")
    (out / "frames").mkdir()
    (out / "frames" / "00000.png").write_bytes(b"a user's picture, named as our first frame would be")
    before = snapshot(tmp_path)
    extra = [e.format(root=ws["root"], out=out) for e in extra]
    if command == "generate":
        argv = generate_args(ws, out / "clip.mp4", *extra)
    elif command == "train":
        argv = train_args(ws, out, *extra)
    else:
        argv = ["info", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message.format(root=re.escape(str(ws["root"]))), err), err
    assert "Traceback" not in err
    assert no_loading == []  # no weight, text encoder or dataset file was read
    assert snapshot(tmp_path) == before  # nothing created, changed or removed
    assert (out / "notes.txt").read_text() == "the user's notes"


def test_an_output_without_room_is_refused_before_any_work(ws, tmp_path, capsys, no_loading, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))  # 1000 bytes free
    assert main(generate_args(ws, tmp_path / "clip.mp4")) == 2
    assert re.search(
        r"--out .*clip.mp4: the output needs about .* GiB but .* has 0.00 GiB free", capsys.readouterr().err
    )
    assert main(train_args(ws, tmp_path / "run")) == 2
    assert re.search(r"--output .*run: the output needs about .* GiB", capsys.readouterr().err)
    assert no_loading == [] and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Output safety
# --------------------------------------------------------------------------------------------------


def test_frames_go_beside_a_users_files_only_with_overwrite_and_replace_only_our_frames(ws, tmp_path, monkeypatch):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    monkeypatch.chdir(folder)
    assert main(generate_args(ws, ".")) == 2  # the working directory is not empty: refused
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert main(generate_args(ws, ".", "--overwrite")) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                                        "00004.png", "notes.txt"]  # fmt: skip
    assert main(generate_args(ws, ".", "--overwrite", "--frames", "1")) == 0  # a shorter video of ours replaces it
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"
    assert tuple(read_video(folder).shape) == (1, 32, 48, 3)


def test_overwrite_replaces_an_existing_video_file(ws, tmp_path):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"old")
    assert main(generate_args(ws, out, "--overwrite")) == 0
    assert tuple(read_video(out).shape) == (5, 32, 48, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "file.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside").write_bytes(b"x")
        write_video(tmp_path / "clip.mp4", torch.rand(2, 16, 16, 3))
        write_video(tmp_path / "frames", torch.rand(2, 16, 16, 3))
        save_lora(tmp_path / "lora.safetensors", {"proj_out": LoraLayer(torch.zeros(2, 8), torch.zeros(8, 2), 2.0)})
    finally:
        os.umask(old)
    for path in ("file.bin", "clip.mp4", "folder/inside", "frames/00000.png", "lora.safetensors"):
        assert (tmp_path / path).stat().st_mode & 0o777 == 0o666 & ~umask, path
    for path in ("folder", "frames"):
        assert (tmp_path / path).stat().st_mode & 0o777 == 0o777 & ~umask, path


def test_help_shows_every_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = []
    for name, sub in commands.items():
        help_text = sub.format_help()
        defaulted = 0
        for action in sub._actions:
            if action.dest == "help" or not action.option_strings or action.default is False or action.required:
                continue  # -h, positionals and off-by-default switches have no default to show
            defaulted += 1
            shown = sub._get_formatter()._get_help_string(action) or ""
            if "default" not in shown:
                missing.append(f"{name} {action.option_strings[0]}")
        # Commands with options that have defaults print them (info and assemble-v1 take required inputs only).
        assert (defaulted == 0) == (name in ("info", "assemble-v1")), name
        assert defaulted == 0 or "(default: " in help_text, name
    assert missing == []


# --------------------------------------------------------------------------------------------------
# Training robustness
# --------------------------------------------------------------------------------------------------


def final_lora(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "easyanimate_lora.safetensors")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_with_a_checkpoint_and_the_resumed_run_is_bit_identical(ws, tmp_path, capsys, monkeypatch, sig):
    """A real SIGTERM (what schedulers send) or SIGINT (Ctrl-C), sent to this process during step 3: the run
    finishes the step, writes its checkpoint, prints the resume command and exits 128 + the signal; resuming
    ends exactly where an uninterrupted run ends (the LoRA bit for bit, every logged loss)."""
    steps = 6
    straight = tmp_path / "straight"
    assert main(train_args(ws, straight, "--max-steps", str(steps), "--checkpoint-every", "1000")) == 0
    real_step = train_module.train_step

    def step_then_sigterm(run, step, examples):
        if step == 2:  # 0-based: optimizer step 3
            os.kill(os.getpid(), sig)
        return real_step(run, step, examples)

    monkeypatch.setattr(train_module, "train_step", step_then_sigterm)
    stopped = tmp_path / "stopped"
    capsys.readouterr()
    assert main(train_args(ws, stopped, "--max-steps", str(steps), "--checkpoint-every", "1000")) == 128 + sig
    monkeypatch.setattr(train_module, "train_step", real_step)
    err = capsys.readouterr().err
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["checkpoint-000003"]
    assert f"{sig.name}: stopped after step 3" in err
    assert not (stopped / "easyanimate_lora.safetensors").exists()  # a stopped run has no final output
    resume = err.strip().splitlines()[-1].strip()
    assert resume.startswith("easyanimate train ") and resume.endswith("--resume latest")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    assert main(shlex.split(resume)[1:]) == 0
    reference, resumed = final_lora(straight), final_lora(stopped)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    losses = [json.loads(line)["loss"] for line in (straight / "loss.jsonl").read_text().splitlines()]
    assert losses == [json.loads(line)["loss"] for line in (stopped / "loss.jsonl").read_text().splitlines()]


def test_process_count_and_global_batch_are_logged_and_old_checkpoints_pruned(ws, tmp_path, capsys, monkeypatch):
    # What `accelerate launch --cpu --num_processes 2` gives the one process it starts (no --multi_cpu).
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    output = tmp_path / "run"
    assert main(train_args(ws, output, "--max-steps", "3", "--checkpoint-every", "1", "--keep-checkpoints", "2")) == 0
    out = capsys.readouterr().out
    assert "1 process on cpu; global batch 1 (1 a process)" in out
    assert "warning: accelerate launch asked for several processes but started this one alone" in out
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-000002", "checkpoint-000003"]


def test_a_run_that_failed_before_its_first_checkpoint_starts_again(ws, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    for name in ("training_args.json", "loss.jsonl", "dataset_probes.json"):  # what such a run leaves
        (output / name).write_text("{}")
    assert main(train_args(ws, output, "--max-steps", "1")) == 0
    lora, checkpoint = output / "easyanimate_lora.safetensors", output / "checkpoints" / "checkpoint-000001"
    umask = current_umask()  # what a trained LoRA and checkpoint get: readable by whom the umask allows
    assert lora.stat().st_mode & 0o777 == 0o666 & ~umask
    assert checkpoint.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (checkpoint / "lora.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_full_disk_is_one_message_with_the_resume_command(ws, tmp_path, capsys, monkeypatch):
    def full_disk(folder, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))

    monkeypatch.setattr(train_module, "write_checkpoint", full_disk)
    output = tmp_path / "run"
    assert main(train_args(ws, output, "--max-steps", "2", "--checkpoint-every", "1")) == 1
    err = capsys.readouterr().err
    assert "error: the disk is full writing" in err and "checkpoint-000001" in err and "--resume latest" in err
    assert "Traceback" not in err


def test_a_failed_video_write_is_one_message(ws, tmp_path, capsys, monkeypatch):
    import easyanimate_core.video_io as video_io

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(video_io, "write_video", full_disk)
    assert main(generate_args(ws, tmp_path / "clip.mp4")) == 1
    err = capsys.readouterr().err
    assert "error: the disk is full writing" in err and "clip.mp4" in err and "Traceback" not in err


def test_a_full_fine_tune_output_is_a_model_folder_generate_loads(ws, tmp_path, capsys):
    output = tmp_path / "full"
    assert main(train_args(ws, output, "--mode", "full", "--max-steps", "1", "--lr", "1e-5")) == 0
    assert (output / "vae").is_symlink() and (output / "tokenizer").is_symlink()
    assert main(generate_args({"model": output}, tmp_path / "clip.mp4")) == 0
    assert json.loads((output / "training_args.json").read_text())["model"] == str(ws["model"])
    (output / "vae").unlink()  # as on a file system without links
    assert main(generate_args({"model": output}, tmp_path / "again.mp4")) == 2
    err = capsys.readouterr().err
    assert "the output of `easyanimate train --mode full`" in err and f"ln -s {ws['model'] / 'vae'}" in err


def test_dataset_probes_are_cached_by_size_and_mtime(ws, tmp_path):
    cache_file = tmp_path / "probes.json"
    first = ProbeCache(cache_file)
    samples = load_dataset(ws["data"], probes=first, log=lambda _: None)
    first.save()
    assert first.probed == 4
    again = ProbeCache(cache_file)
    assert load_dataset(ws["data"], probes=again, log=lambda _: None) == samples and again.probed == 0
    changed = ws["data"].parent / "red.png"
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # as an edited file: a newer mtime
    touched = ProbeCache(cache_file)
    load_dataset(ws["data"], probes=touched, log=lambda _: None)
    assert touched.probed == 1


def test_a_damaged_probe_cache_is_only_a_slower_start(ws, tmp_path):
    cache_file = tmp_path / "probes.json"
    cache_file.write_text("{not json")
    probes = ProbeCache(cache_file)
    assert len(load_dataset(ws["data"], probes=probes, log=lambda _: None)) == 4 and probes.probed == 4
