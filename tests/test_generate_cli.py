"""`easyanimate generate` end to end on tiny random checkpoints written in the official layout."""

from __future__ import annotations

import json
import re

import pytest
import torch

from easyanimate_core.cli import main
from easyanimate_core.video_io import read_metadata, read_video, write_video
from tests.tiny_checkpoint import write_tiny_checkpoint

FRAMES, HEIGHT, WIDTH = 5, 32, 48
COMMON = ["--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {v: write_tiny_checkpoint(root / v, v) for v in ("InP", "Control")}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    g = torch.Generator().manual_seed(0)
    write_video(folder / "clip.mp4", torch.rand(FRAMES + 2, HEIGHT, WIDTH, 3, generator=g))
    write_video(folder / "short.mp4", torch.rand(2, HEIGHT, WIDTH, 3, generator=g))
    for name in ("start", "end"):
        write_video(folder / name, torch.rand(1, HEIGHT, WIDTH, 3, generator=g))  # a folder with one PNG
    return folder


def run(model, out, *extra):
    return main(["generate", "--model", str(model), "--prompt", "a red circle", "--out", str(out), *COMMON, *extra])


@pytest.mark.parametrize(
    "mode, variant, extra",
    [
        ("t2v", "InP", []),
        ("i2v", "InP", ["--image", "{media}/start/00000.png", "--end-image", "{media}/end/00000.png"]),
        ("v2v", "InP", ["--video", "{media}/clip.mp4", "--strength", "0.5"]),
        ("control", "Control", ["--control", "{media}/clip.mp4", "--ref-image", "{media}/start/00000.png"]),
    ],
)
def test_every_mode_writes_a_playable_video(models, media, tmp_path, mode, variant, extra):
    out = tmp_path / f"{mode}.mp4"
    assert run(models[variant], out, *[e.format(media=media) for e in extra]) == 0
    frames = read_video(out)
    assert tuple(frames.shape) == (FRAMES, HEIGHT, WIDTH, 3)
    meta = read_metadata(out)
    assert meta["prompt"] == "a red circle" and meta["variant"] == variant and meta["sampler"] == "Flow"


@pytest.mark.parametrize("suffix", [".gif", ".webp", ""])
def test_other_output_formats(models, tmp_path, suffix):
    out = tmp_path / f"clip{suffix}"
    assert run(models["InP"], out) == 0
    assert read_video(out).shape[0] == FRAMES and read_metadata(out)["seed"] == 1


def test_info_identifies_the_checkpoint(models, capsys):
    assert main(["info", str(models["Control"])]) == 0
    out = capsys.readouterr().out
    assert "EasyAnimate V5.1 transformer" in out and "variant: Control" in out and "tokenizer: present" in out


@pytest.mark.parametrize(
    "variant, extra, message",
    [
        ("InP", ["--sampler", "Heun"], "unknown sampler 'Heun'; valid for V5.1: Flow"),
        ("InP", ["--image", "{media}/clip.mp4"], "--image .*clip.mp4: not a readable image"),
        ("InP", ["--image", "{media}/missing.png"], "--image .*missing.png: no such file"),
        ("InP", ["--video", "{media}/short.mp4"], "--video has 2 frames; --frames 5 were requested"),
        ("InP", ["--control", "{media}/clip.mp4"], "need a Control model; .* is a InP model"),
        ("Control", ["--image", "{media}/start/00000.png"], "a Control model takes no --image"),
    ],
)
def test_bad_inputs_fail_before_loading(models, media, tmp_path, capsys, variant, extra, message):
    out = tmp_path / "x.mp4"
    assert run(models[variant], out, *[e.format(media=media) for e in extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_missing_text_encoder_files_are_listed(models, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models["InP"], broken)
    shutil.rmtree(broken / "tokenizer")
    (broken / "text_encoder" / "model.safetensors").unlink()
    assert run(broken, tmp_path / "x.mp4") == 2
    err = capsys.readouterr().err
    assert "text_encoder/model.safetensors" in err and "tokenizer/tokenizer_config.json" in err


@pytest.mark.parametrize("variant, extra", [("InP", ["--image", "{media}/start/00000.png"]), ("Control", [])])
def test_v5_bert_mt5_models_generate_with_their_ddim_default(tmp_path, media, variant, extra):
    root = write_tiny_checkpoint(tmp_path / "v5", variant, version="V5")
    out = tmp_path / "v5.mp4"
    assert run(root, out, *[e.format(media=media) for e in extra]) == 0
    assert tuple(read_video(out).shape) == (FRAMES, HEIGHT, WIDTH, 3)
    meta = read_metadata(out)
    assert (meta["version"], meta["variant"], meta["sampler"]) == ("V5", variant, "DDIM")


def test_a_lora_changes_the_video_and_is_named_in_its_metadata(models, tmp_path):
    from easyanimate_core.loading import load_transformer
    from easyanimate_core.lora import LoraLayer, lora_targets, save_lora

    transformer = load_transformer(models["InP"])
    g = torch.Generator().manual_seed(0)
    layers = {}
    for path in lora_targets(transformer):
        out_features, in_features = transformer.get_submodule(path).weight.shape
        down, up = torch.randn(2, in_features, generator=g), torch.randn(out_features, 2, generator=g)
        layers[path] = LoraLayer(down, up, 2.0)
    lora = save_lora(tmp_path / "style.safetensors", layers)
    assert run(models["InP"], tmp_path / "plain.mp4") == 0
    assert run(models["InP"], tmp_path / "lora.mp4", "--lora", str(lora), "--lora-strength", "0.5") == 0
    assert not torch.equal(read_video(tmp_path / "plain.mp4"), read_video(tmp_path / "lora.mp4"))
    assert read_metadata(tmp_path / "lora.mp4")["lora"] == "style.safetensors:0.5"


def test_a_missing_lora_fails_before_loading(models, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    assert run(models["InP"], out, "--lora", str(tmp_path / "missing.safetensors")) == 2
    assert "--lora" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "variant, method, extra",
    [
        ("InP", "parts", ["--image", "{media}/start/00000.png", "--end-image", "{media}/end/00000.png"]),
        ("InP", "windows", ["--context-method", "windows", "--riflex"]),
        ("Control", "windows", ["--control", "{long}", "--ref-image", "{media}/start/00000.png"]),
    ],
)
def test_long_clips_in_windows_or_parts(models, media, tmp_path, variant, method, extra):
    """13 frames from 9-frame windows overlapping by 4 (3 latent frames of 4, one shared): the whole length comes out;
    parts for an InP model unless windows are asked for, windows for a Control model."""
    long = tmp_path / "long.mp4"
    write_video(long, torch.rand(13, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(5)))
    out = tmp_path / "out.mp4"
    flags = ["--frames", "13", "--context-frames", "9", "--context-overlap", "4"]
    assert run(models[variant], out, *[e.format(media=media, long=long) for e in extra], *flags) == 0
    assert tuple(read_video(out).shape) == (13, HEIGHT, WIDTH, 3)
    meta = read_metadata(out)
    assert meta["context"] == f"{method} of 9 frames, overlap 4"
    assert ("riflex" in meta) == ("--riflex" in extra)


@pytest.mark.parametrize(
    "variant, extra, message",
    [
        ("InP", ["--context-frames", "8"], r"--context-frames 8: a window must be 4k \+ 1 video frames.*use 5 or 9"),
        ("InP", ["--context-frames", "9", "--context-overlap", "3"], "--context-overlap 3: .*multiple of 4"),
        (
            "InP",
            ["--context-frames", "5", "--context-overlap", "4"],
            "--context-frames 5 is not shorter than --frames 5",
        ),
        (
            "Control",
            ["--frames", "13", "--context-frames", "9", "--context-overlap", "4", "--context-method", "parts"],
            "needs an InP model",
        ),
    ],
)
def test_bad_long_clip_settings_fail_before_loading(models, tmp_path, capsys, variant, extra, message):
    out = tmp_path / "x.mp4"
    assert run(models[variant], out, *extra) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_help_shows_the_latent_frame_arithmetic_of_windows(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--frames 145 is 37 latent frames, --context-frames 49 is 13 and --context-overlap 16 is 4" in text


def test_speed_flags_run_and_are_recorded(models, tmp_path):
    """--cache with the model folder's own fitted polynomial, --cfg-skip, an attention backend by name."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(models["InP"], model)
    (model / "step_cache.json").write_text(json.dumps({"coefficients": [1.0, 0.0]}))
    out = tmp_path / "fast.mp4"
    assert run(model, out, "--cache", "0.5", "--cfg-skip", "0.5", "--steps", "4", "--attention", "sdpa") == 0
    meta = read_metadata(out)
    assert meta["step_cache"].startswith("threshold 0.5, ") and meta["cfg_skip"] == "0.5 at the end"
    assert meta["attention"] == "sdpa"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cache"], r"no step-cache polynomial for this V5.1 model .*bench/fit_step_cache.py"),
        (["--cfg-skip", "1.5"], "--cfg-skip 1.5: the CFG-skip share must be at least 0 and below 1"),
        (["--cache", "-1"], "--cache"),
    ],
)
def test_bad_speed_flags_fail_before_loading(models, tmp_path, capsys, extra, message):
    out = tmp_path / "x.mp4"
    assert run(models["InP"], out, *extra) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


@pytest.fixture(scope="module")
def camera_model(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("camera") / "m", "Camera")


def test_a_control_camera_model_follows_a_preset_motion_or_a_pose_file(camera_model, media, tmp_path):
    from easyanimate_core.camera import camera_motion, pose_entries

    out = tmp_path / "camera.mp4"
    ref = f"{media}/start/00000.png"
    assert run(camera_model, out, "--camera", "pan_left+zoom_in", "--camera-speed", "0.8", "--ref-image", ref) == 0
    assert read_video(out).shape[0] == FRAMES
    poses = tmp_path / "poses.txt"
    rows = pose_entries(camera_motion(["CW"], 1.0, FRAMES))
    poses.write_text("header\n" + "\n".join(" ".join(repr(float(v)) for v in r) for r in rows) + "\n")
    assert run(camera_model, tmp_path / "file.mp4", "--camera-file", str(poses)) == 0


@pytest.mark.parametrize(
    "use_camera_model, extra, message",
    [
        (False, ["--camera", "pan_left"], "--camera / --camera-file need a V5.1 Control-Camera model"),
        (True, ["--camera", "spin"], "unknown camera motion 'spin'"),
        (True, ["--camera-file", "{tmp}/missing.txt"], "--camera-file .*missing.txt: no such file"),
        (True, ["--control", "{media}/clip.mp4"], "a Control-Camera model takes --camera or --camera-file"),
    ],
)
def test_bad_camera_inputs_fail_before_loading(
    models, camera_model, media, tmp_path, capsys, use_camera_model, extra, message
):
    out = tmp_path / "x.mp4"
    model = camera_model if use_camera_model else models["InP"]
    assert run(model, out, *[e.format(media=media, tmp=tmp_path) for e in extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_a_trajectory_drives_a_control_model(models, tmp_path):
    track = [{"x": 5 + 6 * i, "y": 10 + 2 * i} for i in range(FRAMES)]
    path = tmp_path / "points.json"
    path.write_text(json.dumps(track))
    out = tmp_path / "trajectory.mp4"
    assert run(models["Control"], out, "--trajectory", str(path)) == 0
    assert read_video(out).shape[0] == FRAMES and read_metadata(out)["trajectory"] == str(path)
    short = tmp_path / "short.json"
    short.write_text(json.dumps(track[:2]))
    assert run(models["Control"], tmp_path / "x.mp4", "--trajectory", str(short)) == 2
    assert run(models["InP"], tmp_path / "y.mp4", "--trajectory", str(path)) == 2
