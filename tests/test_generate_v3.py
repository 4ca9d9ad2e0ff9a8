"""V1 / V2 / V3 generation: a short sampling run equals the official pipelines on the same tiny weights.

Reference: aigc-apps/EasyAnimate at f9eeabe (the V3 release), ``EasyAnimatePipeline`` (text-to-video, V1) and
``EasyAnimateInpaintPipeline`` (V3 InP, text- and image-to-video), and for V2 its own release fb0916f (whose
pipeline decodes with the hard-coded 0.18215 V2 was trained with), with the official ``Transformer3DModel``, the
official MagViT VAE (V2 / V3) or diffusers' ``AutoencoderKL`` (V1), the released scheduler construction (DPM++ from
the yaml's noise_scheduler_kwargs) and the T5 of the tiny model folder. Point ``EASYANIMATE_OFFICIAL_V3_PATH`` (and
``EASYANIMATE_OFFICIAL_V2_PATH``) at extracted checkouts to run them; otherwise their outputs are read from
tests/data/v3_generate_reference.npz (written by bench/official_v3_generate.py from the same folders, weights and
noise).

Two inputs are made equal on purpose, each tested on its own elsewhere: the VAE's posterior draws (the official
pipeline samples them from torch's global generator, we from the seeded one: both take the mean here), and V3's
CLIP preprocessing (PIL in the official CLIPImageProcessor, torch in ours: within one 8-bit level,
tests/test_v4_image_encoder.py; both use ours here).
Bound: max|ours - official| <= 1e-4 of the video range after 3 DPM++ steps with guidance, in float32.
"""

from __future__ import annotations

import inspect
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from easyanimate_core import pipeline
from easyanimate_core.image_encoder import load_image_encoder
from easyanimate_core.loading import load_transformer, load_vae
from easyanimate_core.pipeline import generate
from easyanimate_core.sampling import make_sampler
from easyanimate_core.text_encoders import load_text_encoders
from tests.official_code import official_module
from tests.tiny_checkpoint import write_tiny_checkpoint

REFERENCE = Path(__file__).resolve().parent / "data" / "v3_generate_reference.npz"
PROMPT, NEGATIVE = "a dog walks on the beach", "blurry, low quality"
STEPS, GUIDANCE, SEED = 3, 6.0, 11
# (version, case): frames and pixel size of each run (the VAEs' frame rules: V1 any, V2 9k, V3 8k).
CASES = {
    ("V1", "t2v"): (3, 16, 32),
    ("V2", "t2v"): (9, 32, 32),
    ("V3", "t2v"): (8, 32, 32),
    ("V3", "i2v"): (8, 32, 32),
}
YAML_SCHEDULER = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "steps_offset": 1}


def case_id(version: str, case: str) -> str:
    return f"{version.lower()}_{case}"


def start_image(height: int, width: int) -> torch.Tensor:
    """A reproducible start image [H, W, 3] in [0, 1] on the 8-bit grid."""
    g = torch.Generator().manual_seed(5)
    return (torch.rand(height, width, 3, generator=g) * 255).round() / 255


class _Folders(dict):
    """Tiny model folders written on first use, one per version."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, version: str) -> Path:
        self[version] = write_tiny_checkpoint(self.root / version, version=version)
        return self[version]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return _Folders(tmp_path_factory.mktemp("pixart"))


def initial_noise(vae, frames: int, height: int, width: int) -> torch.Tensor:
    s = vae.config.spatial_compression
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(1, 4, vae.latent_frames(frames), height // s, width // s, generator=g)


def ours(folder: Path, version: str, case: str, monkeypatch) -> torch.Tensor:
    """Our video [1, 3, F, H, W] in [0, 1]."""
    frames, height, width = CASES[(version, case)]
    monkeypatch.setattr(pipeline, "encode_sample", lambda vae, pixels, device, generator: pipeline.encode_mean(
        vae, pixels, device
    ))  # fmt: skip
    transformer, vae = load_transformer(folder), load_vae(folder)
    prompts = load_text_encoders(folder, version).encode(PROMPT, NEGATIVE)
    kw = {}
    if case == "i2v":
        encoder = load_image_encoder(folder, output="image_embeds")
        kw = dict(start_image=start_image(height, width), image_encoder=encoder)
    video = generate(
        transformer, vae, prompts, make_sampler("DPM++", version, STEPS), frames=frames, height=height, width=width,
        guidance=GUIDANCE, latents=initial_noise(vae, frames, height, width), **kw,
    )  # fmt: skip
    return video.permute(3, 0, 1, 2)[None]


# ------------------------------------------------------------------------------------------------ official


def official_modules(root: str) -> types.SimpleNamespace:
    """The official pipeline and model classes of a V2- or V3-era checkout."""
    return types.SimpleNamespace(
        transformer=official_module(root, "easyanimate.models.transformer3d").Transformer3DModel,
        magvit=official_module(root, "easyanimate.models.autoencoder_magvit").AutoencoderKLMagvit,
        t2v=official_module(root, "easyanimate.pipeline.pipeline_easyanimate").EasyAnimatePipeline,
        inpaint=official_module(root, "easyanimate.pipeline.pipeline_easyanimate_inpaint"),
    )


def _official_model(cls, folder: Path):
    """An official model class built from a tiny folder's config.json and loaded with its weights (strict)."""
    config = json.loads((folder / "config.json").read_text())
    accepted = inspect.signature(cls.__init__).parameters
    model = cls(**{k: v for k, v in config.items() if k in accepted}).eval()
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return model


def official(folder: Path, version: str, case: str, root: str, monkeypatch) -> torch.Tensor:
    """The official pipeline's video [1, 3, F, H, W] in [0, 1] on the same folder, noise and inputs."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from transformers import T5EncoderModel, T5Tokenizer

    modules = official_modules(root)
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: None)  # the inpaint pipeline calls it, CUDA or not
    frames, height, width = CASES[(version, case)]
    # Each VAE through its own from_pretrained, as the official tools load them (the MagViT one reads config.json
    # with diffusers' from_config and the weights non-strictly).
    vae = (AutoencoderKL if version == "V1" else modules.magvit).from_pretrained(folder / "vae").eval()
    parts = dict(
        tokenizer=T5Tokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(folder / "text_encoder").eval(),
        vae=vae,
        transformer=_official_model(modules.transformer, folder / "transformer"),
        scheduler=DPMSolverMultistepScheduler(**YAML_SCHEDULER),
    )
    s = 2 ** (len(vae.config.block_out_channels) - 1)
    t = 1 if frames == 1 else frames // vae.mini_batch_encoder * vae.mini_batch_decoder if version != "V1" else frames
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn(1, 4, t, height // s, width // s, generator=g)
    run = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE, video_length=frames, height=height, width=width,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise, clean_caption=False, return_dict=False,
    )  # fmt: skip
    sample = DiagonalGaussianDistribution.sample
    try:
        DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
        if version != "V3":
            with torch.no_grad():
                return torch.as_tensor(modules.t2v(**parts)(**run))
        encoder = load_image_encoder(folder, output="image_embeds")
        pipe = modules.inpaint.EasyAnimateInpaintPipeline(
            **parts, clip_image_encoder=encoder.model, clip_image_processor=_OurClipProcessor(encoder)
        )
        video = torch.zeros(1, 3, frames, height, width)
        mask = torch.ones(1, 1, frames, height, width) * 255
        clip_image = None
        if case == "i2v":
            image = start_image(height, width)
            video[:] = image.permute(2, 0, 1)[:, None]
            mask[:, :, 0] = 0
            clip_image = image
        with torch.no_grad():
            out = pipe(**run, video=video, mask_video=mask, clip_image=clip_image)
        return torch.as_tensor(out)
    finally:
        DiagonalGaussianDistribution.sample = sample


class _OurClipProcessor:
    """Stands in for CLIPImageProcessor: our torch preprocessing of the same [H, W, 3] image."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, images, return_tensors="pt"):
        from easyanimate_core.image_encoder import preprocess

        return {"pixel_values": preprocess(images, **self.encoder.settings)}


# ------------------------------------------------------------------------------------------------ tests


def _check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    print(f"max |ours - official| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize(("version", "case"), list(CASES))
def test_matches_committed_official_videos(folders, monkeypatch, version, case):
    expected = torch.from_numpy(np.load(REFERENCE)[case_id(version, case)])
    _check(ours(folders[version], version, case, monkeypatch), expected)


def official_root(version: str) -> str | None:
    """The checkout of the release whose pipeline ``version`` ran with (V2: its own; V1 and V3: V3's)."""
    return os.environ.get("EASYANIMATE_OFFICIAL_V2_PATH" if version == "V2" else "EASYANIMATE_OFFICIAL_V3_PATH")


@pytest.mark.parametrize(("version", "case"), list(CASES))
def test_matches_official_pipeline(folders, monkeypatch, version, case):
    root = official_root(version)
    if not root:
        pytest.skip(f"set EASYANIMATE_OFFICIAL_{'V2' if version == 'V2' else 'V3'}_PATH to run the official pipeline")
    expected = official(folders[version], version, case, root, monkeypatch)
    _check(ours(folders[version], version, case, monkeypatch), expected)


def test_the_compared_inputs_are_live():
    """The start image reaches the video (image-to-video differs from text-to-video by far more than the bound)."""
    reference = np.load(REFERENCE)
    assert np.abs(reference["v3_i2v"] - reference["v3_t2v"]).max() > 1e-2
