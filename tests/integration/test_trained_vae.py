"""A VAE trained by `easyanimate train-vae` in a real ComfyUI server: the EasyAnimate VAE Loader lists and loads its
output folder, and our encode + ComfyUI's stock VAEDecode run on it."""

from __future__ import annotations

import pytest
from test_vae_nodes import encode_decode_prompt

from easyanimate_core.cli import main
from tests.test_train_vae import VAE_CONFIG, write_dataset, write_vae_folder

pytestmark = pytest.mark.integration

NAME = "trained-vae"


@pytest.fixture(scope="module")
def trained_vae(comfy_server, tmp_path_factory):
    """Three steps of `easyanimate train-vae` on tiny clips, its output folder in models/EasyAnimate/."""
    work = tmp_path_factory.mktemp("train_vae")
    output = comfy_server.base_dir / "models" / "EasyAnimate" / NAME
    if not output.is_dir():
        args = ["train-vae", "--vae", str(write_vae_folder(work / "start", VAE_CONFIG))]
        args += ["--data", str(write_dataset(work / "data")), "--output", str(output)]
        args += ["--size", "32", "--frames", "5", "--max-steps", "3", "--validation-every", "0"]
        assert main(args) == 0
    return output


def test_the_vae_loader_loads_a_trained_vae_and_decodes_with_it(comfy_server, trained_vae):
    info = comfy_server.get_json("/object_info/EasyAnimateVAELoader")["EasyAnimateVAELoader"]
    assert NAME in info["input"]["required"]["model_folder"][0]
    files = comfy_server.output_files(comfy_server.run_prompt(encode_decode_prompt(NAME), timeout=300))
    assert len(files) == 5 and all(f.stat().st_size > 0 for f in files)
