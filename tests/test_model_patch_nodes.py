"""Model-patch nodes on the stand-in: EasyAnimate RIFLEx."""

from __future__ import annotations

import pytest
import torch

from easyanimate_core.context import riflex_frequency
from tests.comfy_standin import install


def load_model(nodes, tiny_folders, version="V5.1"):
    return nodes.nodes.EasyAnimateModelLoader().load(install(nodes, tiny_folders, version), "default")[0]


def call(patcher, frames: int, embeds: torch.Tensor) -> torch.Tensor:
    """One diffusion-model call with the patcher's transformer options, as ComfyUI's BaseModel makes it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, frames, 2, 4, generator=g)
    options = patcher.model_options["transformer_options"]
    return patcher.model.diffusion_model(x, torch.tensor([400.0]), embeds, transformer_options=options)


def test_riflex_changes_only_clips_longer_than_the_trained_length(nodes, tiny_folders):
    model = load_model(nodes, tiny_folders)
    patched = nodes.nodes.EasyAnimateRIFLEx().patch(model, trained_frames=9)[0]  # 3 latent frames
    assert "easyanimate_riflex_trained_frames" not in model.model_options["transformer_options"]  # a clone
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(call(patched, 3, embeds), call(model, 3, embeds))
    longer = call(patched, 6, embeds)
    assert not torch.allclose(longer, call(model, 6, embeds))
    transformer = model.model.diffusion_model.transformer
    frequency = riflex_frequency(transformer.config.attention_head_dim, 3, 6)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 6, 2, 4, generator=g)
    inpaint = torch.zeros(1, 17, 6, 2, 4)
    direct = transformer(x, torch.tensor([400.0]), embeds, inpaint_latents=inpaint, rope_temporal_frequency=frequency)
    torch.testing.assert_close(longer, direct[:, :16], rtol=0, atol=0)


def test_riflex_on_v4_or_with_a_bad_length_is_refused(nodes, tiny_folders):
    with pytest.raises(ValueError, match="V4 and other models have none: remove the node"):
        nodes.nodes.EasyAnimateRIFLEx().patch(load_model(nodes, tiny_folders, "V4"), 49)
    with pytest.raises(ValueError, match="trained_frames 48 must be 4k \\+ 1"):
        nodes.nodes.EasyAnimateRIFLEx().patch(load_model(nodes, tiny_folders), 48)
