"""Training data: checking the official metadata JSON, aspect / frame buckets, batch plans and clip loading."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from easyanimate_core.cli import main
from easyanimate_core.training.dataset import (
    Bucket,
    BucketRule,
    Sample,
    batch_plan,
    clip_indices,
    load_clip,
    load_dataset,
    resize_crop,
)
from easyanimate_core.video_io import write_video
from tests.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A metadata file with two good entries and seven bad ones of every kind."""
    folder = tmp_path_factory.mktemp("data")
    write_video(folder / "good.mp4", torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(0)))
    write_video(folder / "short.mp4", torch.rand(2, 32, 32, 3))
    (folder / "broken.mp4").write_bytes(b"not a video")
    (folder / "broken.png").write_bytes(b"not an image")
    Image.fromarray(np.full((32, 48, 3), 120, np.uint8)).save(folder / "good.png")
    entries = [
        {"file_path": "good.mp4", "text": "a noisy clip", "type": "video"},
        {"file_path": "missing.mp4", "text": "gone", "type": "video"},
        {"file_path": "broken.mp4", "text": "broken", "type": "video"},
        {"file_path": "short.mp4", "text": "too short", "type": "video"},
        {"file_path": "good.png", "text": "  ", "type": "image"},
        {"file_path": "good.png", "text": "a grey picture", "type": "audio"},
        {"file_path": "broken.png", "text": "broken picture", "type": "image"},
        {"file_path": "good.png", "text": "a grey picture", "type": "image"},
        "good.png",
    ]
    (folder / "metadata.json").write_text(json.dumps(entries))
    return folder / "metadata.json"


EXPECTED_PROBLEMS = [
    r"#1 \(missing.mp4\): missing file .*missing.mp4",
    r"#2 \(broken.mp4\): unreadable video",
    r"#3 \(short.mp4\): too short: 2 frames, at least 5 needed \(--min-frames\)",
    r"#4 \(good.png\): empty caption",
    r"#5 \(good.png\): unknown type 'audio' \(valid: video, image\)",
    r"#6 \(broken.png\): unreadable image",
    r"#8: not an object with file_path, text and type",
]


def test_every_bad_entry_is_listed_with_its_index(data):
    with pytest.raises(ValueError) as err:
        load_dataset(data)
    message = str(err.value)
    assert message.startswith("7 of 9 entries in") and "--skip-bad-samples" in message
    for pattern in EXPECTED_PROBLEMS:
        assert re.search(pattern, message), pattern


def test_skip_bad_samples_keeps_the_good_ones_and_says_how_many(data):
    said = []
    samples = load_dataset(data, skip_bad=True, log=said.append)
    assert [(s.index, s.kind, s.frames, s.height, s.width) for s in samples] == [
        (0, "video", 9, 32, 32),
        (7, "image", 1, 32, 48),
    ]
    assert said[0].startswith("skipping 7 bad samples of 9")


def test_train_reports_bad_data_before_loading_weights(data, tmp_path, capsys):
    model = write_tiny_checkpoint(tmp_path / "model", "InP")
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out")]
    args += ["--resolutions", "32", "--frames", "5", "--stride", "1", "--max-steps", "1", "--rank", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert all(re.search(pattern, err) for pattern in EXPECTED_PROBLEMS)
    assert not (tmp_path / "out").exists()
    assert main([*args, "--skip-bad-samples"]) == 0
    assert "skipping 7 bad samples of 9" in capsys.readouterr().out
    assert (tmp_path / "out" / "easyanimate_lora.safetensors").is_file()


def sample(kind="video", frames=100, height=1024, width=1024) -> Sample:
    return Sample(0, None, "x", kind, frames, height, width)


def test_buckets_follow_the_aspect_table_and_the_token_budget():
    # Official numbers (spec §6.3): 49 frames of 512x512 = 13 x 32 x 32 = 13,312 tokens; at 1024 that buys 9 frames.
    rule = BucketRule((512, 1024), max_frames=49, token_budget=13 * 32 * 32)
    assert rule.bucket(sample()) == Bucket(9, 1024, 1024)
    assert rule.bucket(sample(height=600, width=600)) == Bucket(49, 512, 512)
    assert rule.bucket(sample(height=384, width=672)) == Bucket(49, 384, 672)  # ratio 0.57
    assert rule.bucket(sample(frames=20, height=384, width=672)) == Bucket(17, 384, 672)  # 4k+1 of what it has
    assert rule.bucket(sample("image", 1, 768, 512)) == Bucket(1, 608, 416)  # ratio 1.5 -> 1.46
    assert BucketRule((256, 512), 49, 13 * 32 * 32).bucket(sample(height=200, width=200)) == Bucket(49, 256, 256)
    with pytest.raises(ValueError, match="4k\\+1"):
        BucketRule((512,), 48, 1000)


def test_batches_share_a_bucket_cover_each_epoch_and_repeat_with_the_seed():
    buckets = [Bucket(5, 32, 32)] * 3 + [Bucket(1, 32, 16)] * 3
    plan = batch_plan(buckets, 3, seed=7)
    first = [next(plan) for _ in range(4)]
    assert [epoch for epoch, _ in first] == [0, 0, 1, 1]
    assert all(len({buckets[i] for i in batch}) == 1 for _, batch in first)
    assert sorted(i for _, batch in first[:2] for i in batch) == list(range(6))
    again = batch_plan(buckets, 3, seed=7)
    assert [next(again) for _ in range(4)] == first
    other = batch_plan(buckets, 3, seed=8)
    assert [next(other) for _ in range(4)] != first
    # A bucket smaller than the batch fills up across epochs (as the official sampler's carried-over buckets).
    lonely = batch_plan([Bucket(5, 32, 32), Bucket(1, 32, 16), Bucket(1, 32, 16)], 2, seed=0)
    batches = [next(lonely)[1] for _ in range(3)]
    assert [0, 0] in batches


def test_clips_take_frames_at_the_stride_from_a_random_start():
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(20):
        indices = clip_indices(100, 5, 3, g)
        assert np.diff(indices).tolist() == [3, 3, 3, 3] and 0 <= indices[0] <= 87
        starts.add(indices[0])
    assert len(starts) > 5
    assert clip_indices(9, 5, 3, g) == [0, 2, 4, 6, 8]  # too short for stride 3: the stride shrinks
    assert clip_indices(1, 1, 3, g) == [0]


def test_clips_load_from_mp4_and_frame_folders_resized_and_centre_cropped(tmp_path):
    video = torch.zeros(9, 40, 64, 3)
    video[:, :, 24:40] = 1.0  # a white band in the middle columns survives the centre crop
    write_video(tmp_path / "clip.mp4", video)
    write_video(tmp_path / "frames", video)  # a folder of PNGs
    for path in (tmp_path / "clip.mp4", tmp_path / "frames"):
        entry = Sample(0, path, "x", "video", 9, 40, 64)
        clip = load_clip(entry, Bucket(5, 32, 32), 2, torch.Generator())
        assert clip.shape == (3, 5, 32, 32) and -1 <= clip.min() and clip.max() <= 1
        assert clip[:, :, :, 14:18].mean() > 0.8 and clip[:, :, :, :4].mean() < -0.8
    crop = resize_crop(torch.rand(1, 10, 30, 3), 16, 16)
    assert crop.shape == (3, 1, 16, 16)
