"""The micro model: word-level tokenizer, untrained checkpoint through our loaders and CLI, the VAE trainer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from easyanimate_core import inspect_checkpoint, load_text_encoders, load_vae
from easyanimate_core.cli import main as cli_main
from easyanimate_core.micro import data, model, train_vae
from easyanimate_core.video_io import read_metadata, read_video


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory):
    """An untrained micro InP model folder."""
    return model.write_initial_checkpoint(tmp_path_factory.mktemp("micro") / "model", "InP", seed=0)


def test_every_vocabulary_word_is_one_token():
    tokenizer = model.build_tokenizer()
    for word in model.vocabulary():
        for text in (word, f" {word}"):
            assert len(tokenizer(text).input_ids) == 1, tokenizer.tokenize(text)
    longest = max((a.caption for a in data.all_attributes(data.ALL_COLOURS)), key=len)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": longest}]}], tokenize=False, add_generation_prompt=True
    )
    tokens = tokenizer.tokenize(chat)
    assert len(tokens) <= model.MAX_TOKENS
    assert tokens[3:13] == ["a", *[f"Ġ{w}" for w in longest.split()[1:]]]


def test_untrained_checkpoint_is_a_v51_model(micro_root):
    transformer = inspect_checkpoint(micro_root / "transformer", kind="transformer")
    vae = inspect_checkpoint(micro_root / "vae", kind="vae")
    assert (transformer.version, transformer.variant, vae.version) == ("V5.1", "InP", "V5.1")
    assert transformer.config == model.transformer_config("InP").replace(compat=transformer.config.compat)
    assert vae.config == model.vae_config()


def test_captions_differ_from_the_first_differing_word_on(micro_root):
    """The encoder is causal: two captions share embeddings up to the word that differs, and differ after it."""
    text = load_text_encoders(micro_root)
    red = data.Attributes("circle", "red", "left", "slowly", "black").caption
    blue = data.Attributes("circle", "blue", "left", "slowly", "black").caption
    embeds = text.encode_texts([red, blue]).embeds
    assert embeds.shape == (2, model.MAX_TOKENS, model.TEXT_WIDTH)
    same = (embeds[0] - embeds[1]).abs().amax(dim=-1) == 0
    first_colour = 4  # <|im_start|> user \n a <colour>
    assert same[:first_colour].all() and not same[first_colour:].any()


def test_generate_cli_runs_the_untrained_model(micro_root, tmp_path):
    out = tmp_path / "video.mp4"
    argv = ["generate", "--model", str(micro_root), "--prompt", "a red circle moving left slowly on a black background"]
    argv += ["--frames", "9", "--width", "64", "--height", "64", "--steps", "2", "--out", str(out)]
    assert cli_main(argv) == 0
    assert read_video(out).shape == (9, 64, 64, 3)


def test_vae_training_path_equals_encode_and_decode(micro_root):
    vae = load_vae(micro_root)
    video = train_vae.training_batch(seed=0, step=0, batch=1, frames=9)
    with torch.no_grad():
        mean, logvar = train_vae.posterior(vae, video)
        ref_mean, ref_logvar = vae.encode(video)
        # Same layers and chunking; only the convolution algorithm may differ with the input's length.
        torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(logvar, ref_logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(train_vae.reconstruct(vae, mean), vae.decode(mean), atol=1e-5, rtol=0)


def _vae_args(micro_root, output, steps, workers=0):
    return SimpleNamespace(
        model=micro_root, output=output, steps=steps, batch=1, frames=1, crop=32, full_from=3, full_batch=1,
        full_frames=1, lr=1e-3, warmup=2, seed=0, checkpoint_every=100, minutes=0, lr_schedule="cosine",
        device="cpu", workers=workers,
    )  # fmt: skip


def test_vae_batches_rendered_by_workers_train_the_same_weights(micro_root, tmp_path):
    from safetensors.torch import load_file

    assert train_vae.train(_vae_args(micro_root, tmp_path / "main", 3)) == 3
    assert train_vae.train(_vae_args(micro_root, tmp_path / "workers", 3, workers=2)) == 3
    main = load_file(tmp_path / "main" / "state" / "vae.safetensors")
    workers = load_file(tmp_path / "workers" / "state" / "vae.safetensors")
    assert all(torch.equal(main[k], workers[k]) for k in main)


def test_vae_training_resumes_exactly(micro_root, tmp_path):
    from safetensors.torch import load_file

    assert train_vae.train(_vae_args(micro_root, tmp_path / "whole", 4)) == 4
    assert train_vae.train(_vae_args(micro_root, tmp_path / "split", 2)) == 2
    assert train_vae.train(_vae_args(micro_root, tmp_path / "split", 4)) == 4
    whole = load_file(tmp_path / "whole" / "state" / "vae.safetensors")
    split = load_file(tmp_path / "split" / "state" / "vae.safetensors")
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "split" / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    start = load_vae(micro_root).state_dict()
    assert any(not torch.equal(start[k], whole[k]) for k in start)

    vae_folder = train_vae.finish(micro_root, tmp_path / "whole", clips=2)
    config = json.loads((vae_folder / "config.json").read_text())
    assert config["scaling_factor"] > 0 and config["scaling_factor"] != model.VAE_CONFIG["scaling_factor"]
    assert load_vae(vae_folder).config.scaling_factor == config["scaling_factor"]


def test_generate_without_model_uses_the_shipped_micro_model_and_its_defaults(micro_root, tmp_path, monkeypatch):
    import easyanimate_core.micro as micro

    monkeypatch.setattr(micro, "MICRO_MODEL", micro_root)
    out = tmp_path / "video.mp4"
    assert cli_main(["generate", "--prompt", "a red circle moving left slowly on a black background", "--steps", "2",
                     "--out", str(out)]) == 0  # fmt: skip
    assert read_video(out).shape == (model.GENERATION_DEFAULTS["frames"], 64, 64, 3)  # the folder's 17 x 64 x 64
    assert read_metadata(out)["model"] == str(micro_root)


def test_generate_without_model_in_an_install_without_weights_says_what_to_pass(tmp_path, monkeypatch, capsys):
    import easyanimate_core.micro as micro

    monkeypatch.setattr(micro, "MICRO_MODEL", tmp_path / "micro_model")
    assert cli_main(["generate", "--prompt", "a red circle", "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert "no --model given" in err and "pass --model <model folder>" in err
    assert not (tmp_path / "v.mp4").exists()


def test_a_broken_generation_defaults_file_is_named(micro_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "model"
    shutil.copytree(micro_root, root)
    (root / "generation_defaults.json").write_text('{"width": 64, "colour": "red"}')
    assert cli_main(["generate", "--model", str(root), "--prompt", "x", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "generation_defaults.json: expected a JSON object" in capsys.readouterr().err


def _recipe_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "train_micro.py"
    spec = importlib.util.spec_from_file_location("train_micro", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_settings_change_from_the_command_line_and_zero_inpaint_steps_pass_the_t2v_weights_on(tmp_path):
    recipe_module = _recipe_module()
    argv = ["--work", str(tmp_path), "--set", "init.patch=1", "t2v.steps=40", "inp.steps=0", "lora.lr=5e-4"]
    argv += ["inp.masks=2", "wrap.steps=7"]
    recipe = recipe_module.Recipe(recipe_module.parse_args(argv))
    assert recipe.init_settings["patch"] == 1 and recipe.t2v_settings["steps"] == 40
    assert recipe.inp_settings["masks"] == 2 and recipe.wrap_settings["steps"] == 7
    assert recipe.lora_settings["lr"] == "5e-4" and recipe_module.LORA["lr"] == "2e-3"  # the module's stay
    for bad in ("t2v.stpes=3", "vea.steps=3", "t2v.steps="):
        with pytest.raises(SystemExit, match="STAGE.KEY=VALUE"):
            recipe_module.Recipe(recipe_module.parse_args(["--work", "w", "--set", bad]))

    trained = tmp_path / "t2v_run" / "transformer"
    trained.mkdir(parents=True)
    (trained / "config.json").write_text("{}")
    recipe.inp()
    assert (tmp_path / "inp_run" / "transformer" / "config.json").read_text() == "{}"
    assert (tmp_path / "inp_run" / "done").is_file()
