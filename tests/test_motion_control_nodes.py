"""Camera and trajectory nodes on the stand-in: motions, pose files, conditioning for Control-Camera models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from easyanimate_core.camera import camera_motion, pose_entries
from tests.comfy_standin import link_tree
from tests.test_conditioning_nodes import load_vae, text_conditioning
from tests.tiny_checkpoint import write_tiny_checkpoint

W, H, F = 32, 16, 5


@pytest.fixture(scope="module")
def camera_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_camera") / "m", "Camera")


@pytest.fixture(scope="module")
def control_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_control") / "m", "Control", version="V5.1")


def camera_model(nodes, folder, name="camera"):
    link_tree(folder, nodes.models / name)
    return nodes.nodes.EasyAnimateModelLoader().load(name, "default")[0].model


def test_camera_motion_presets_move_together_and_chain(nodes):
    n = nodes.nodes
    first = n.EasyAnimateCameraMotion().make("Pan Left", "Zoom In", 1.0, 5)[0]
    np.testing.assert_allclose(first, camera_motion(["Pan Left", "Zoom In"], 1.0, 5))
    chained = n.EasyAnimateCameraMotion().make("CW", "Static", 0.5, 4, camera=first)[0]
    assert chained.shape == (9, 3, 4)


def test_camera_from_file_reads_the_input_folder_only(nodes, tmp_path):
    import folder_paths

    rows = pose_entries(camera_motion(["Pan Up"], 1.0, F))
    input_dir = tmp_path.parent / "input"
    input_dir.mkdir(exist_ok=True)
    (input_dir / "poses.txt").write_text("url\n" + "\n".join(" ".join(repr(float(v)) for v in r) for r in rows))
    original = folder_paths.get_input_directory
    folder_paths.get_input_directory = lambda: str(input_dir)
    try:
        assert "poses.txt" in nodes.nodes.EasyAnimateCameraFromFile.INPUT_TYPES()["required"]["pose_file"][0]
        poses = nodes.nodes.EasyAnimateCameraFromFile().load("poses.txt")[0]
        np.testing.assert_allclose(poses, camera_motion(["Pan Up"], 1.0, F))
        with pytest.raises(ValueError, match="absolute path"):
            nodes.nodes.EasyAnimateCameraFromFile().load("/etc/passwd")
    finally:
        folder_paths.get_input_directory = original


def test_camera_control_conditions_a_control_camera_model(nodes, tiny_folders, camera_folder):
    model = camera_model(nodes, camera_folder)
    vae = load_vae(nodes, tiny_folders)
    motion = camera_motion(["Zoom In"], 1.0, F)
    ref = torch.rand(1, 24, 40, 3, generator=torch.Generator().manual_seed(3))
    positive, negative, latent = nodes.nodes.EasyAnimateCameraControl().encode(
        text_conditioning(), text_conditioning(), vae, W, H, F, 1, motion, ref_image=ref
    )
    control = positive[0][1]["easyanimate_control_latents"]
    assert control.shape == (1, 6 + 16, 2, 2, 4) and control[:, :6].abs().sum() > 0
    [[embeds, _]] = text_conditioning()
    conds = model.extra_conds(cross_attn=embeds, noise=latent["samples"], easyanimate_control_latents=control)
    assert conds["control_latents"].cond.shape[1] == 6 and conds["reference_latents"].cond.shape[2] == 1
    out = model.diffusion_model(
        latent["samples"], torch.tensor([500.0]), embeds, **{k: v.cond for k, v in conds.items() if k != "c_crossattn"}
    )
    assert out.shape == latent["samples"].shape and torch.isfinite(out).all()


def test_camera_and_control_conditioning_are_refused_on_the_other_model(
    nodes, tiny_folders, camera_folder, control_folder
):
    [[embeds, _]] = text_conditioning()
    noise = torch.zeros(1, 16, 2, 2, 4)
    camera = camera_model(nodes, camera_folder)
    with pytest.raises(ValueError, match="Control-Camera model: it follows camera poses.*EasyAnimate Camera Control"):
        camera.extra_conds(cross_attn=embeds, noise=noise, easyanimate_control_latents=torch.zeros(1, 16, 2, 2, 4))
    control = camera_model(nodes, control_folder, "control")
    with pytest.raises(ValueError, match="needs a V5.1 Control-Camera model, but this is a Control model"):
        control.extra_conds(cross_attn=embeds, noise=noise, easyanimate_control_latents=torch.zeros(1, 22, 2, 2, 4))


def test_trajectory_node_draws_the_control_video(nodes):
    video = nodes.nodes.EasyAnimateTrajectory().draw(
        '[{"x": 4, "y": 5}, {"x": 12, "y": 6}, {"x": 20, "y": 8}]', 32, 16
    )[0]
    assert video.shape == (3, 16, 32, 3) and video.dtype == torch.float32
    with pytest.raises(ValueError, match="coordinates must be JSON"):
        nodes.nodes.EasyAnimateTrajectory().draw("4,5", 32, 16)
