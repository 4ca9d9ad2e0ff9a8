"""`easyanimate prepare` on generated footage with known cuts (64x48 px, 8 fps; tests/prepare_footage.py).

The sources: a.mp4 holds four 5-s scenes joined by hard cuts (moving, static, moving under large burned-in text,
fast), b.mp4 one 12.5-s moving scene and a 2-s one, sub/c.mp4 is too small. The expectations are derived from
those parameters and the official rules (3-10 s clips, 0.5 s trimmed before a cut), not copied from a run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from easyanimate_core.training.prepare.__main__ import main as prepare
from easyanimate_core.training.prepare.captions import CaptionTable, read_caption_map
from easyanimate_core.training.prepare.split import SplitSettings, plan_clips
from easyanimate_core.training.prepare.stages import MotionStage
from tests.prepare_footage import FPS, HEIGHT, WIDTH, Scene, render, write_footage
from tests.tiny_prepare_models import write_aesthetic_head, write_tiny_clip, write_tiny_llava

REPO = Path(__file__).resolve().parents[1]
RED, GREEN, BLUE = (255, 90, 90), (90, 255, 90), (90, 140, 255)
YELLOW, MAGENTA, CYAN = (255, 255, 90), (255, 90, 255), (90, 255, 255)
A_SCENES = [
    Scene("moving", 40, RED, 1),
    Scene("static", 40, GREEN, 2),
    Scene("moving", 40, BLUE, 3, text="TEXT"),
    Scene("fast", 40, YELLOW, 4),
]
B_SCENES = [Scene("moving", 100, MAGENTA, 5), Scene("moving", 16, CYAN, 6)]
C_SCENES = [Scene("moving", 40, RED, 7)]
# Optical flow in pixels is small on 64x48 frames; the official 20 is for ~720p. 12 lies between the moving
# scenes (about 5) and the fast one (about 30). --min-pixels 64x48 drops only the 32x24 video.
FLAGS = ["--min-pixels", str(WIDTH * HEIGHT), "--max-motion", "12", "--no-progress"]
TEMPLATE = "a video of {caption}"


def expected_clips(scenes: list[Scene], fps: float = FPS, min_s: float = 3, max_s: float = 10, trim_s: float = 0.5):
    """[(start, end)] of the clips the official rules make of the scenes (trim before a cut, drop short,
    cut long ones into max_s pieces), worked out here from the scene lengths."""
    bounds = np.cumsum([0] + [s.frames for s in scenes]).tolist()
    total, clips = bounds[-1], []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        end = end - round(trim_s * fps) if end < total else end
        while end - start >= min_s * fps:
            clips.append((start, min(end, start + int(max_s * fps))))
            start += int(max_s * fps)
    return clips


def decoded_frames(path: Path) -> np.ndarray:
    """Every frame of a video as RGB [F, H, W, 3], counted by decoding (not from the container)."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])
    capture.release()
    return np.stack(frames)


def nearest_source_frame(frame: np.ndarray, source_frames: np.ndarray, index: int) -> int:
    """Which of the source frames index - 1, index, index + 1 a decoded frame is closest to (mean abs error)."""
    around = [i for i in (index - 1, index, index + 1) if 0 <= i < len(source_frames)]
    errors = [np.abs(frame.astype(int) - source_frames[i].astype(int)).mean() for i in around]
    return around[int(np.argmin(errors))]


def records(out: Path, stage: str) -> dict[str, dict]:
    """The records of a stage, by clip (or source)."""
    lines = (out / "records" / f"{stage}.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    return {e.get("clip", e.get("source")): e for e in entries}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare") / "videos"
    cuts = {
        "a.mp4": write_footage(root / "a.mp4", A_SCENES),
        "b.mp4": write_footage(root / "b.mp4", B_SCENES),
        "sub/c.mp4": write_footage(root / "sub" / "c.mp4", C_SCENES, width=32, height=24),
    }
    (root / "a.txt").write_text("a red field drifting\n")
    (root / "b.txt").write_text("a magenta wave")
    return {"root": root, "cuts": cuts}


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
    """One local run with one worker, all filters at their defaults but --max-motion / --min-pixels (see FLAGS)."""
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    assert (
        prepare([str(sources["root"]), "--out", str(out), "--workers", "1", "--caption-template", TEMPLATE, *FLAGS])
        == 0
    )
    return out


def test_cuts_are_found_within_one_frame_and_clips_are_frame_exact(sources, prepared):
    split = records(prepared, "split")
    for name, scenes in (("a.mp4", A_SCENES), ("b.mp4", B_SCENES)):
        found = [start for start, _ in split[name]["scenes"][1:]]
        assert len(found) == len(sources["cuts"][name])
        assert all(abs(f - c) <= 1 for f, c in zip(found, sources["cuts"][name], strict=True)), (found, sources)
        clips = split[name]["clips"]
        assert [(c["start"], c["end"]) for c in clips] == expected_clips(scenes)
        source_frames, _ = render(scenes)
        for clip in clips:
            frames = decoded_frames(prepared / clip["clip"])
            assert len(frames) == clip["end"] - clip["start"]
            # The first and last frames are the source's frames at start and end - 1, not their neighbours.
            for frame, index in ((frames[0], clip["start"]), (frames[-1], clip["end"] - 1)):
                nearest = nearest_source_frame(frame, source_frames, index)
                assert nearest == index or np.array_equal(source_frames[nearest], source_frames[index])
    assert split["sub/c.mp4"]["skipped"].startswith("fewer pixels than --min-pixels")
    assert not (prepared / "clips" / "sub").exists()  # a refused source is not cut


def test_each_filter_drops_exactly_the_clips_it_should(prepared):
    text, motion = records(prepared, "text"), records(prepared, "motion")
    # The scene with burned-in letters is the only one with text, and only the text filter drops it.
    assert max(text, key=lambda clip: text[clip]["text_area"]) == "clips/a_2.mp4"
    assert [c for c, r in text.items() if r["text_area"] > 0.02] == ["clips/a_2.mp4"]
    assert "clips/a_2.mp4" not in motion  # later stages see only what earlier ones kept
    # Static scene under --min-motion 2, fast one above --max-motion 12, the moving ones between.
    assert motion["clips/a_1.mp4"]["motion"] < 2 < motion["clips/a_0.mp4"]["motion"] < 12
    assert 2 < motion["clips/b_0_0.mp4"]["motion"] < 12 < motion["clips/a_3.mp4"]["motion"]
    dataset = json.loads((prepared / "metadata.json").read_text())
    assert dataset == [
        {"file_path": "clips/a_0.mp4", "text": "a video of a red field drifting", "type": "video"},
        {"file_path": "clips/b_0_0.mp4", "text": "a video of a magenta wave", "type": "video"},
    ]


def test_the_dataset_trains(prepared, tmp_path):
    from easyanimate_core.cli import main
    from tests.tiny_checkpoint import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "m", "InP")
    args = ["train", "--model", str(model), "--data", str(prepared / "metadata.json"), "--output", str(tmp_path / "t")]
    args += ["--max-steps", "2", "--resolutions", "32", "--frames", "5", "--batch-size", "1", "--rank", "4"]
    assert main(args) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "t" / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_a_killed_run_resumes_without_redoing_finished_clips(sources, prepared, tmp_path):
    out = tmp_path / "dataset"
    # The child runs the real command with each motion score slowed down, so the kill lands mid-stage.
    child = (
        "import sys, time\n"
        "from easyanimate_core.training.prepare import stages\n"
        "score = stages.MotionStage.score\n"
        "stages.MotionStage.score = lambda self, item: (time.sleep(1.0), score(self, item))[1]\n"
        "from easyanimate_core.training.prepare.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = [sys.executable, "-c", child, str(sources["root"]), "--out", str(out), "--workers", "1", *FLAGS]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    motion_file = out / "records" / "motion.jsonl"
    deadline = time.monotonic() + 120
    while not (motion_file.exists() and motion_file.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {stage: (out / "records" / f"{stage}.jsonl").read_text() for stage in ("split", "text", "motion")}
    assert 1 <= before["motion"].count("\n") < len(records(prepared, "motion"))
    assert not (out / "metadata.json").exists()
    clip_times = {p: p.stat().st_mtime_ns for p in (out / "clips").rglob("*.mp4")}
    with open(motion_file, "a") as f:  # a write torn by the kill: no newline
        f.write('{"clip": "clips/b_0_0.mp4", "mot')

    assert prepare([str(sources["root"]), "--out", str(out), "--workers", "1", *FLAGS]) == 0
    for stage, text in before.items():  # earlier records kept as they were, each clip recorded once
        after = (out / "records" / f"{stage}.jsonl").read_text()
        assert after.startswith(text)
        keys = [json.loads(line).get("clip", json.loads(line).get("source")) for line in after.splitlines()]
        assert len(keys) == len(set(keys)) == len(records(prepared, stage))
    assert {p: p.stat().st_mtime_ns for p in clip_times} == clip_times  # no clip cut again
    assert records(out, "motion") == records(prepared, "motion")
    dataset = json.loads((out / "metadata.json").read_text())
    assert [e["file_path"] for e in dataset] == ["clips/a_0.mp4", "clips/b_0_0.mp4"]


def test_interrupted_filter_resumes_where_it_stopped(sources, prepared, tmp_path, monkeypatch, capsys):
    out, calls = tmp_path / "dataset", []
    score = MotionStage.score

    def interrupted(self, item):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third clip
        calls.append(item["clip"])
        return score(self, item)

    monkeypatch.setattr(MotionStage, "score", interrupted)
    args = [str(sources["root"]), "--out", str(out), "--workers", "1", "--caption-template", TEMPLATE, *FLAGS]
    assert prepare(args) == 130
    assert "rerun the same command to continue" in capsys.readouterr().err
    first = list(calls)
    monkeypatch.setattr(MotionStage, "score", lambda self, item: (calls.append(item["clip"]), score(self, item))[1])
    assert prepare(args) == 0
    assert sorted(calls) == sorted(records(prepared, "motion")) and len(calls) == len(set(calls))
    assert calls[: len(first)] == first
    assert (out / "metadata.json").read_text() == (prepared / "metadata.json").read_text()


def test_ray_gives_the_same_dataset_and_scores_as_the_local_run(sources, prepared, tmp_path):
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")
    out = tmp_path / "dataset"
    args = [str(sources["root"]), "--out", str(out), "--ray", "--workers", "2", "--caption-template", TEMPLATE]
    assert prepare([*args, *FLAGS]) == 0
    assert json.loads((out / "metadata.json").read_text()) == json.loads((prepared / "metadata.json").read_text())
    for stage in ("split", "duration", "text", "motion"):
        assert records(out, stage) == records(prepared, stage), stage


def test_model_filters_and_model_captions_on_whole_videos(sources, tmp_path):
    """--no-split: a.mp4 (four scenes, 20 s) fails the scene-transition check, a 2-s video the duration check,
    one of two single-scene videos the aesthetic threshold, and the tiny LLaVA captions the rest."""
    root = tmp_path / "clips"
    root.mkdir()
    os.link(sources["root"] / "a.mp4", root / "a.mp4")
    write_footage(root / "short.mp4", [Scene("moving", 16, CYAN, 8)])
    write_footage(root / "d.mp4", [Scene("moving", 40, RED, 9)])
    write_footage(root / "e.mp4", [Scene("moving", 40, YELLOW, 10)])
    clip = write_tiny_clip(tmp_path / "clip")
    head = write_aesthetic_head(tmp_path / "head.safetensors", width=16)
    llava = write_tiny_llava(tmp_path / "llava")
    # The aesthetic threshold between d and e, from the scores worked out here with transformers directly.
    scores = {name: _aesthetic_reference(clip, head, root / name) for name in ("d.mp4", "e.mp4")}
    threshold = sum(scores.values()) / 2
    low = min(scores, key=scores.get)
    out = tmp_path / "dataset"
    args = [str(root), "--out", str(out), "--no-split", "--max-seconds", "30", "--min-pixels", "0", "--workers", "1"]
    args += ["--skip", "text", "motion", "--consistency-model", str(clip), "--aesthetic-model", str(clip)]
    args += ["--aesthetic-head", str(head), "--min-aesthetic", str(threshold), "--caption-model", str(llava)]
    args += ["--captions", "none", "--caption-max-tokens", "4", "--caption-template", TEMPLATE, "--no-progress"]
    assert prepare(args) == 0
    duration, consistency = records(out, "duration"), records(out, "consistency")
    assert duration["../clips/short.mp4"]["seconds"] == 2.0 and "../clips/short.mp4" not in consistency
    assert consistency["../clips/a.mp4"]["min_similarity"] < 0.8 <= consistency[f"../clips/{low}"]["min_similarity"]
    assert set(consistency["../clips/a.mp4"]["frames"]) >= {0, 40, 80, 120, 159}  # the cuts are I-frames
    aesthetic = records(out, "aesthetic")
    assert aesthetic[f"../clips/{low}"]["aesthetic"] == pytest.approx(scores[low], abs=1e-4)
    kept = sorted({"d.mp4", "e.mp4"} - {low})
    captions = records(out, "caption")
    assert list(captions) == [f"../clips/{name}" for name in kept] and captions[f"../clips/{kept[0]}"]["caption"]
    dataset = json.loads((out / "metadata.json").read_text())
    assert dataset == [
        {
            "file_path": f"../clips/{kept[0]}",
            "text": TEMPLATE.format(caption=captions[f"../clips/{kept[0]}"]["caption"]),
            "type": "video",
        }  # fmt: skip
    ]
    assert (out / dataset[0]["file_path"]).resolve() == (root / kept[0]).resolve()


def _aesthetic_reference(clip_folder: Path, head_file: Path, video: Path) -> float:
    """Mean over 4 uniformly sampled frames of head(unit CLIP image embedding), computed here independently."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPModel

    frames = decoded_frames(video)
    picked = [frames[i] for i in np.linspace(0, len(frames), 4, endpoint=False, dtype=int)]
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPImageProcessor.from_pretrained(clip_folder)
    with torch.no_grad():
        features = model.get_image_features(**processor(images=picked, return_tensors="pt")).pooler_output
        x = torch.nn.functional.normalize(features, dim=-1)
        w = load_file(head_file)
        x = x @ w["layers.0.weight"].T + w["layers.0.bias"]
        x = x @ w["layers.2.weight"].T + w["layers.2.bias"]
    return float(x.mean())


def test_caption_maps_and_lookup_order(tmp_path):
    (tmp_path / "map.csv").write_text("file_name,caption\nwalk.mp4,a walk\nsub/walk.mp4,the other walk\n")
    (tmp_path / "map.json").write_text(json.dumps([{"file_path": "clips/walk_0.mp4", "text": "clip caption"}]))
    (tmp_path / "map.jsonl").write_text(json.dumps({"video_path": "walk.mp4", "caption": "from jsonl"}) + "\n")
    (tmp_path / "bad.csv").write_text("name_of_file,words\nwalk.mp4,a walk\n")
    table = CaptionTable("map", read_caption_map(tmp_path / "map.csv"))
    assert table.lookup("/v/sub/walk.mp4", "sub/walk.mp4", "clips/sub/walk_0.mp4") == ("the other walk", "map")
    assert table.lookup("/v/walk.mp4", "walk.mp4", "clips/walk_0.mp4") == ("a walk", "map")
    table = CaptionTable("map", {**read_caption_map(tmp_path / "map.json"), "walk.mp4": "source caption"})
    assert table.lookup("/v/walk.mp4", "walk.mp4", "clips/walk_0.mp4") == ("clip caption", "map")
    assert read_caption_map(tmp_path / "map.jsonl") == {"walk.mp4": "from jsonl"}
    with pytest.raises(ValueError, match="row 1 needs a file column"):
        read_caption_map(tmp_path / "bad.csv")


def test_plan_follows_the_official_length_rules_at_ntsc_rates():
    fps = 30000 / 1001  # 3 s = 89.9 frames: 90 needed; 10 s = 299.7: pieces of 299; 0.5 s trim = 15 frames
    scenes = [(0, 120), (120, 140), (140, 800), (800, 1000)]
    plans, dropped = plan_clips(scenes, 1000, fps, SplitSettings())
    assert [(p.start, p.end, p.suffix) for p in plans] == [
        (0, 105, "_0"),
        (140, 439, "_2_0"),
        (439, 738, "_2_1"),
        (800, 1000, "_3"),  # the last scene ends with the video: nothing trimmed
    ]
    assert [(s, e) for s, e, _ in dropped] == [(120, 125), (738, 785)]


def test_inputs_are_checked_before_any_work(sources, prepared, tmp_path, monkeypatch, capsys):
    def refused(*args) -> str:
        assert prepare([str(a) for a in args]) == 2
        return capsys.readouterr().err

    root = sources["root"]
    assert "SRC" in refused(tmp_path / "missing", "--out", tmp_path / "o")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not the output of `easyanimate prepare`" in refused(root, "--out", foreign)
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    changed = refused(root, "--out", prepared, "--scene-threshold", "30", *FLAGS)
    assert "--scene-threshold was 27.0, now 30.0" in changed
    assert "--caption-template" in refused(root, "--out", tmp_path / "o", "--caption-template", "no placeholder")
    assert "--max-seconds" in refused(root, "--out", tmp_path / "o", "--max-seconds", "2")
    assert "--aesthetic-head go together" in refused(root, "--out", tmp_path / "o", "--aesthetic-model", tmp_path)
    assert "--captions" in refused(root, "--out", tmp_path / "o", "--captions", tmp_path / "none.csv")
    clip = write_tiny_clip(tmp_path / "clip")
    assert "not an image-text-to-text one" in refused(root, "--out", tmp_path / "o", "--caption-model", clip)
    clash = tmp_path / "clash"
    clash.mkdir()
    for name in ("walk.mp4", "walk.mov"):
        (clash / name).write_bytes(b"")
    assert "differing only in extension" in refused(clash, "--out", tmp_path / "o")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert 'pip install "ray[data]"' in refused(root, "--out", tmp_path / "o", "--ray")
    assert not (tmp_path / "o").exists()  # nothing was written by any refused run
