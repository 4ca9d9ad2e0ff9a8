"""The micro model's procedural data and its scorers: the scorers get the generator's own videos right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from easyanimate_core.micro import data, scoring
from easyanimate_core.training.dataset import load_dataset
from easyanimate_core.video_io import read_video


def _spread(attributes: list[data.Attributes], n: int) -> list[data.Attributes]:
    """``n`` combinations spread over the list (so every value of every attribute appears)."""
    step = max(1, len(attributes) // n)
    return attributes[::step][:n]


def test_captions_name_every_attribute():
    a = data.Attributes("circle", "red", "right", "slowly", "navy")
    assert a.caption == "a red circle moving right slowly on a navy background"
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        data.Attributes("circle", "pink", "right", "slowly", "black")


def test_held_out_pairs_never_in_training_but_every_value_is():
    train, held = data.training_attributes(), data.held_out_attributes()
    assert held and not set(train) & set(held)
    assert {(a.colour, a.shape) for a in held} == set(data.HELD_OUT_PAIRS)
    for field, values in (("colour", data.COLOURS), ("shape", data.SHAPES), ("direction", data.DIRECTIONS)):
        assert {getattr(a, field) for a in train} == set(values)
    assert not {a.colour for a in train} & set(data.EXTRA_COLOURS)


def test_bounded_clips_stay_inside_the_frame():
    for clip in data.sample_clips(data.all_attributes(), 2, seed=3, wrap=False):
        for t in (0, clip.frames - 1):
            x, y = clip.centre(t)
            reach = clip.radius * 1.25
            assert reach <= x <= clip.size - reach and reach <= y <= clip.size - reach


def test_wrapping_clips_come_back_at_the_opposite_edge():
    clips = data.sample_clips(data.all_attributes(), 2, seed=3)
    for clip in clips:
        reach = clip.radius * 1.25
        dx, dy = data.DIRECTIONS[clip.attributes.direction]
        for t in range(clip.frames):
            x, y = clip.centre(t)
            assert 0 <= x < clip.size and 0 <= y < clip.size
            across = y if dx else x  # across the motion the shape is always wholly inside
            assert reach <= across <= clip.size - reach
    # Starts anywhere along the motion: some clips cross an edge within their 17 frames.
    crossing = [c for c in clips if abs(c.centre(c.frames - 1)[0] - c.centre(0)[0]) > 40]
    assert crossing
    clip = crossing[0]
    t = next(t for t in range(clip.frames) if min(clip.centre(t)[0], clip.size - clip.centre(t)[0]) < 3)
    frame = data.render_frame(clip, t).astype(int)
    background = np.array(data.BACKGROUNDS[clip.attributes.background])
    shown = np.abs(frame - background).sum(-1) > 60
    assert shown[:, :3].any() and shown[:, -3:].any()  # half the shape at each side
    assert scoring.analyse(frame[None].astype(np.uint8)).counts == [1]  # one object on the torus


@pytest.mark.parametrize(("seed", "frames", "wrap"), [(0, 17, True), (1, 17, False), (2, 49, True)])
def test_scorers_get_rendered_videos_right(seed, frames, wrap):
    rng = np.random.default_rng(seed)
    attributes = _spread(data.all_attributes(data.ALL_COLOURS), 72)
    clips = [data.sample_clip(a, rng, frames=frames, wrap=wrap) for a in attributes]
    scores = [scoring.score(data.render(clip), clip.attributes) for clip in clips]
    rates = scoring.summarise(scores)
    assert rates == {
        "colour_ok": 1.0,
        "direction_ok": 1.0,
        "speed_ok": 1.0,
        "shape_ok": 1.0,
        "one_object_frames": 1.0,
        "samples": len(clips),
    }


@pytest.mark.parametrize("video_format", ["mp4", "png"])
def test_scorers_get_the_written_videos_right(tmp_path, video_format):
    attributes = _spread(data.training_attributes(), 12)
    json_path = data.write_dataset(tmp_path, attributes, per_combination=1, seed=5, video_format=video_format)
    entries = json.loads(json_path.read_text())
    samples = load_dataset(json_path, log=lambda _: None)  # the trainer's own checks accept it
    assert [s.text for s in samples] == [a.caption for a in attributes]
    assert all(s.frames == data.FRAMES and (s.height, s.width) == (data.SIZE, data.SIZE) for s in samples)
    for entry, sample in zip(entries, samples, strict=True):
        assert set(entry) >= {"file_path", "text", "type"} and entry["type"] == "video"
        clip = data.clip_from_json(entry["clip"])
        result = scoring.score(read_video(sample.path), clip.attributes)
        assert result["colour_ok"] and result["direction_ok"] and result["speed_ok"] and result["shape_ok"]
        assert result["one_object_share"] == 1.0


def test_same_seed_same_clips_other_seed_other_clips():
    attributes = _spread(data.training_attributes(), 5)
    assert data.sample_clips(attributes, 2, 7) == data.sample_clips(attributes, 2, 7)
    assert data.sample_clips(attributes, 2, 7) != data.sample_clips(attributes, 2, 8)


def test_scorers_catch_wrong_videos():
    clip = data.sample_clip(data.Attributes("square", "yellow", "up", "quickly", "gray"), np.random.default_rng(0))
    video = data.render(clip)
    asked_red_left = data.Attributes("square", "red", "left", "quickly", "gray")
    result = scoring.score(video, asked_red_left)
    assert not result["colour_ok"] and not result["direction_ok"] and result["colour"] == "yellow"

    static = np.repeat(video[:1], len(video), axis=0)
    assert scoring.analyse(static).direction == "static"

    far = np.roll(video, video.shape[2] // 2, axis=2)
    assert scoring.analyse(np.maximum(video, far)).counts[0] == 2  # two shapes half a frame apart

    twins = video.copy()
    twins[:, :, 40:] = np.flip(video, axis=2)[:, :, 40:]  # a mirrored copy of the shape on the right
    assert scoring.analyse(twins).counts[0] == 2

    blank = np.broadcast_to(np.array(data.BACKGROUNDS["gray"], np.uint8), video.shape)
    found = scoring.analyse(blank)
    assert found.counts == [0] * len(video) and found.colour is None and found.direction == "none"
    speck = blank.copy()
    speck[:, 10:12, 10:12] = 255  # 4 pixels: noise, not an object
    assert scoring.analyse(speck).counts == [0] * len(video)


def test_colours_are_named_through_blends_with_the_background():
    """A shape blended into its background (a block-averaging decoder) keeps its colour's name: half-covered cyan
    over black is nearer to plain green than to cyan, yet lies on the black-cyan line."""
    for background in data.BACKGROUNDS.values():
        bg = np.asarray(background, np.float32)
        for name, colour in data.ALL_COLOURS.items():
            for share in (0.45, 0.7, 1.0):
                blend = bg + share * (np.asarray(colour, np.float32) - bg)
                assert scoring.mixed_colour(blend, bg) == name, (name, background, share)
    half_cyan = 0.5 * np.asarray(data.EXTRA_COLOURS["cyan"], np.float32)
    plain_nearest = min(data.ALL_COLOURS, key=lambda n: np.linalg.norm(np.asarray(data.ALL_COLOURS[n]) - half_cyan))
    assert plain_nearest == "green" and scoring.mixed_colour(half_cyan, np.zeros(3, np.float32)) == "cyan"


def test_scorers_take_float_tensors():
    clip = data.sample_clip(data.Attributes("triangle", "white", "down", "slowly", "black"), np.random.default_rng(1))
    frames = torch.from_numpy(data.render(clip)).float() / 255
    assert scoring.score(frames, clip.attributes)["direction_ok"]
    with pytest.raises(ValueError, match=r"expected frames \[F, H, W, 3\]"):
        scoring.analyse(frames[0])


def test_eval_cases_spread_over_held_out_prompts_with_distinct_seeds():
    from easyanimate_core.micro.evaluate import eval_cases, start_image

    held = data.held_out_attributes()
    few = eval_cases(held, 8, first_seed=100)
    assert len(few) == 8 and len({c.attributes for c in few}) == 8 and [c.seed for c in few] == list(range(100, 108))
    many = eval_cases(held, len(held) + 4)
    assert [c.attributes for c in many[: len(held)]] == held and many[len(held)].attributes == held[0]
    image = start_image(few[0])
    assert image.shape == (data.SIZE, data.SIZE, 3) and torch.equal(image, start_image(few[0]))
    # A first frame of the asked-for attributes, from a seed far from the training data's.
    assert scoring.analyse(image[None].repeat(2, 1, 1, 1)).colour == few[0].attributes.colour
