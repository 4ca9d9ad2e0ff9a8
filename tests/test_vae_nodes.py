"""The EasyAnimate VAE as ComfyUI's VAE type, its loader, decode / encode nodes and latent previews (stand-in)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

import easyanimate_core.preview as preview
from easyanimate_core.vae import MagvitVAE, decode_memory, plan_decode
from tests.comfy_standin import install
from tests.tiny_checkpoint import VAE_CONFIG


def vae_folder(nodes, tmp_path):
    """Register models/vae/ with the stand-in's folder_paths (ComfyUI registers it by default)."""
    folder = tmp_path / "models" / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    sys.modules["folder_paths"].add_model_folder_path("vae", str(folder))
    return folder


def load(nodes, tiny_folders, version="V5.1"):
    return nodes.nodes.EasyAnimateVAELoader().load(install(nodes, tiny_folders, version))[0]


def latents(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def core_frames(core: MagvitVAE, z: torch.Tensor, **kw) -> torch.Tensor:
    """What the decode node should return: core's decode as IMAGE frames [B*F, H, W, 3]."""
    with torch.no_grad():
        video = ((core.decode(z, **kw) + 1) / 2).clamp(0, 1)
    return video.permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[3:], 3)


# ---- the VAE type and its loader -------------------------------------------------------------------------


def test_loader_returns_comfys_vae_type_over_the_core_vae(nodes, tiny_folders):
    vae = load(nodes, tiny_folders)
    native = nodes.package.vae_nodes
    assert isinstance(vae, sys.modules["comfy.sd"].VAE)
    assert isinstance(vae.first_stage_model, MagvitVAE)
    assert vae.patcher.model is vae.first_stage_model
    assert native.easyanimate_vae(vae) is vae.first_stage_model
    assert nodes.nodes.EasyAnimateVAELoader.RETURN_TYPES == ("VAE",)
    # The attributes stock nodes read, with Wan-2.1-like values: 4k+1 frames <-> k+1 latents, 8x8 pixels.
    assert (vae.latent_channels, vae.latent_dim, vae.output_channels) == (16, 3, 3)
    assert vae.downscale_ratio[0](49) == 13 and vae.upscale_ratio[0](13) == 49
    assert vae.spacial_compression_decode() == vae.spacial_compression_encode() == 8
    assert vae.temporal_compression_decode() == 4
    assert vae.memory_used_decode((1, 16, 13, 48, 84), torch.bfloat16) > 0


def test_easyanimate_vae_refuses_other_vaes(nodes):
    other = sys.modules["comfy.sd"].VAE()
    other.first_stage_model = torch.nn.Conv2d(4, 3, 1)
    for vae in (other, object()):
        with pytest.raises(ValueError, match="not an EasyAnimate VAE; load it with EasyAnimate VAE Loader"):
            nodes.package.vae_nodes.easyanimate_vae(vae)


def test_loader_lists_folders_and_vae_files_and_loads_a_single_file(nodes, tiny_folders, tmp_path):
    name = install(nodes, tiny_folders, "V5.1")
    folder = vae_folder(nodes, tmp_path)
    shutil.copy(tiny_folders["V5.1"] / "vae" / "diffusion_pytorch_model.safetensors", folder / "ea.safetensors")
    (folder / "ea.json").write_text(json.dumps(VAE_CONFIG))  # a non-released geometry needs its config beside it
    (folder / "old.pt").write_bytes(b"")  # pickle files are never listed
    loader = nodes.nodes.EasyAnimateVAELoader
    assert loader.INPUT_TYPES()["required"]["model_folder"][0] == [name, "ea.safetensors"]
    assert loader.VALIDATE_INPUTS(name) is True and loader.VALIDATE_INPUTS("ea.safetensors") is True
    single = loader().load("ea.safetensors")[0]
    from_folder = loader().load(name)[0]
    for (k, a), b in zip(single.first_stage_model.state_dict().items(), from_folder.get_sd().values(), strict=True):
        assert torch.equal(a, b), k


def test_loader_refuses_other_families_at_validation_naming_the_fix(nodes, tmp_path):
    folder = vae_folder(nodes, tmp_path)
    sd_like = {  # an SD-style AutoencoderKL: conv names ComfyUI's own VAELoader reads
        "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        "encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
        "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
        "quant_conv.weight": torch.zeros(8, 8, 1, 1),
        "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
    }
    save_file(sd_like, folder / "sdxl_vae.safetensors")
    validate = nodes.nodes.EasyAnimateVAELoader.VALIDATE_INPUTS
    message = validate("sdxl_vae.safetensors")
    assert message.startswith("vae/sdxl_vae.safetensors is not an EasyAnimate VAE (")
    assert message.endswith("load other VAEs with ComfyUI's VAELoader (Load VAE)")
    assert "neither a folder under models/EasyAnimate/" in validate("missing.safetensors")


# ---- decode ------------------------------------------------------------------------------------------------


def test_decode_node_gives_image_frames_equal_to_core_decode(nodes, tiny_folders):
    vae = load(nodes, tiny_folders)
    z = latents((2, 16, 3, 4, 6))
    (image,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae)
    assert nodes.mm.loads == [[vae.patcher]]
    assert image.shape == (2 * 9, 32, 48, 3) and image.is_contiguous()
    torch.testing.assert_close(image, core_frames(vae.first_stage_model, z), rtol=0, atol=0)


def test_decode_refuses_image_latents(nodes, tiny_folders):
    vae = load(nodes, tiny_folders)
    with pytest.raises(ValueError, match=r"expected video latents \[B, 16, T, h, w\], got \[1, 4, 8, 8\]"):
        nodes.nodes.EasyAnimateVAEDecode().decode({"samples": torch.zeros(1, 4, 8, 8)}, vae)
    assert nodes.mm.loads == []  # refused before the VAE was loaded


def test_stock_vae_methods_equal_the_node(nodes, tiny_folders):
    """What VAEDecode / VAEDecodeTiled / VAEEncode call: vae.decode, vae.decode_tiled, vae.encode."""
    vae = load(nodes, tiny_folders)
    z = latents((1, 16, 2, 6, 6))
    (node,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae)
    stock = vae.decode(z)
    assert stock.shape == (1, 5, 48, 48, 3)  # VAEDecode flattens the batch itself
    torch.testing.assert_close(stock.reshape(-1, 48, 48, 3), node, rtol=0, atol=0)
    # VAEDecodeTiled(tile_size=32, overlap=8, temporal_size=4) passes latent units: 4, 1, 1 latents (2x2 tiles).
    (tiled_node,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae, 1, 32, 8)
    tiled = vae.decode_tiled(z, tile_x=4, tile_y=4, overlap=1, tile_t=1, overlap_t=1)
    torch.testing.assert_close(tiled.reshape(-1, 48, 48, 3), tiled_node, rtol=0, atol=0)
    torch.testing.assert_close(
        tiled_node, core_frames(vae.first_stage_model, z, tile_latent_size=4, tile_overlap=1), rtol=0, atol=0
    )
    pixels = node  # [5, 48, 48, 3]
    (encoded,) = nodes.nodes.EasyAnimateVAEEncode().encode(pixels, vae)
    torch.testing.assert_close(vae.encode(pixels), encoded["samples"], rtol=0, atol=0)
    # VAEEncodeTiled passes pixels and frames: 32 px tiles, 8 px overlap, 8 frames -> 4 / 1 latent pixels, chunk 8.
    (tiled_encoded,) = nodes.nodes.EasyAnimateVAEEncode().encode(pixels, vae, 8, 32, 8)
    stock_tiled = vae.encode_tiled(pixels, tile_x=32, tile_y=32, overlap=8, tile_t=8, overlap_t=4)
    torch.testing.assert_close(stock_tiled, tiled_encoded["samples"], rtol=0, atol=0)
    assert not torch.equal(stock_tiled, encoded["samples"])  # it did tile


def test_auto_tiles_when_free_memory_is_short(nodes, tiny_folders, monkeypatch):
    vae = load(nodes, tiny_folders)
    core = vae.first_stage_model
    z = latents((1, 16, 2, 12, 12))
    out_bytes = 5 * 96 * 96 * 3 * 4  # the IMAGE output, on the same device (CPU) here, so off the budget
    budget = int(vae.memory_used_decode(z.shape, torch.float32) * 0.6)
    nodes.mm.free_memory = budget + out_bytes
    seen = []
    decode = core.decode
    monkeypatch.setattr(core, "decode", lambda *a, **kw: seen.append(kw.get("tile_latent_size")) or decode(*a, **kw))
    (image,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae)
    planned = plan_decode(core, z.shape, torch.float32, budget)
    assert seen[0] == planned.tile == 9  # the largest square tile within 60% of the untiled memory: 81 <= 0.6 * 144
    assert decode_memory(core.config, z.shape, torch.float32, planned.chunk, planned.tile) <= budget
    assert decode_memory(core.config, z.shape, torch.float32, planned.chunk, planned.tile + 1) > budget
    torch.testing.assert_close(image, core_frames(core, z, tile_latent_size=9), rtol=0, atol=0)


def test_decode_out_of_memory_retries_with_tiles_and_keeps_the_frames(nodes, tiny_folders, monkeypatch, caplog):
    vae = load(nodes, tiny_folders)
    core = vae.first_stage_model
    z = latents((1, 16, 2, 8, 16))
    calls = []
    decode = core.decode

    def decode_or_oom(*args, **kwargs):
        calls.append((kwargs.get("chunk_latents"), kwargs.get("tile_latent_size")))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return decode(*args, **kwargs)

    monkeypatch.setattr(core, "decode", decode_or_oom)
    (image,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae)
    assert calls[:2] == [(1, None), (1, 8)]  # auto plan: untiled; retry: 8x8 tiles (3 across)
    assert "ran out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); retrying" in caplog.text
    torch.testing.assert_close(image, core_frames(core, z, tile_latent_size=8), rtol=0, atol=0)


def test_decode_is_interruptible_between_chunks(nodes, tiny_folders):
    vae = load(nodes, tiny_folders)
    nodes.mm.interrupt_at = 2
    with pytest.raises(nodes.mm.InterruptProcessingException):
        nodes.nodes.EasyAnimateVAEDecode().decode({"samples": latents((1, 16, 4, 4, 4))}, vae, 1)
    assert nodes.mm.interrupt_checks == 2
    assert all(not getattr(m, "cache", ()) for m in vae.first_stage_model.modules())  # no state left behind


# ---- encode ------------------------------------------------------------------------------------------------


def test_encode_node_gives_the_core_posterior_mean(nodes, tiny_folders):
    vae = load(nodes, tiny_folders)
    pixels = torch.rand(9, 32, 48, 3, generator=torch.Generator().manual_seed(1))
    (out,) = nodes.nodes.EasyAnimateVAEEncode().encode(pixels, vae, 4, 0, 64)
    with torch.no_grad():
        mean, _ = vae.first_stage_model.encode(pixels.permute(3, 0, 1, 2)[None] * 2 - 1, chunk_frames=4)
    assert out["samples"].shape == (1, 16, 3, 4, 6)
    torch.testing.assert_close(out["samples"], mean, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("frames", "height", "width", "message"),
    [
        (10, 32, 32, "EasyAnimate VAE Encode: 10 frames: the mag VAE expects 4k+1 frames; nearest valid: 9 or 13"),
        (9, 40, 32, "EasyAnimate VAE Encode: height 40 is not a multiple of 16; nearest valid: 32 or 48"),
        (1, 32, 100, "EasyAnimate VAE Encode: width 100 is not a multiple of 16; nearest valid: 96 or 112"),
    ],
)
def test_encode_refuses_frame_counts_and_sizes_naming_the_nearest_valid(
    nodes, tiny_folders, frames, height, width, message
):
    vae = load(nodes, tiny_folders)
    with pytest.raises(ValueError) as error:
        nodes.nodes.EasyAnimateVAEEncode().encode(torch.zeros(frames, height, width, 3), vae)
    assert str(error.value) == message
    assert nodes.mm.loads == []  # refused before the VAE was loaded
    with pytest.raises(ValueError, match="temporal_chunk must be 0 .auto. or a multiple of 4, got 6"):
        nodes.nodes.EasyAnimateVAEEncode().encode(torch.zeros(9, 32, 32, 3), vae, 6)


# ---- latent previews ---------------------------------------------------------------------------------------


def test_model_latent_format_fits_preview_colours_from_its_folders_vae_and_caches_them(nodes, tiny_folders, tmp_path):
    root = nodes.models / install(nodes, tiny_folders, "V5.1")
    fmt = nodes.native.EasyAnimateLatentFormat()
    fmt.attach_vae_near(root / "transformer")
    assert fmt.vae_source == root
    factors, bias = fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias
    assert len(factors) == 16 and all(len(row) == 3 for row in factors) and len(bias) == 3
    # Model-space factors: the VAE-space fit divided by the scaling factor, so x0 (model space) maps to colours.
    fit = preview.latent_rgb_for_checkpoint(root)
    assert factors[0][0] == pytest.approx(fit.factors[0][0] / fmt.scale_factor)
    cached = list((tmp_path / "user" / "easyanimate" / "latent_rgb").glob("*.json"))
    assert len(cached) == 1


def test_previews_fall_back_to_the_last_loaded_vae_and_never_break_sampling(nodes, tiny_folders, monkeypatch, caplog):
    fmt = nodes.native.EasyAnimateLatentFormat()
    fmt.attach_vae_near(nodes.models.parent / "diffusion_models" / "single.safetensors")  # a file: no folder VAE
    assert fmt.latent_rgb_factors is None  # nothing to fit from: ComfyUI then shows no latent2rgb preview
    load(nodes, tiny_folders)
    fresh = nodes.native.EasyAnimateLatentFormat()
    assert len(fresh.latent_rgb_factors) == 16  # from the VAE the loader loaded
    monkeypatch.setattr(nodes.native.EasyAnimateLatentFormat, "recent_vae", nodes.models / "gone")
    broken = nodes.native.EasyAnimateLatentFormat()
    assert broken.latent_rgb_factors is None and broken.latent_rgb_factors_bias is None
    assert "no latent previews; fitting colours from the VAE at" in caplog.text


def test_our_vae_runs_comfys_own_constructor_first_so_attributes_of_newer_comfyui_exist(
    nodes, tiny_folders, caplog, monkeypatch
):
    base = sys.modules["comfy.sd"].VAE
    real_init = base.__init__

    def newer_init(self, *args, **kwargs):  # a ComfyUI whose constructor sets one more attribute (0.8.0: size, ...)
        self.added_by_a_newer_comfyui = None
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(base, "__init__", newer_init)
    vae = load(nodes, tiny_folders)
    assert hasattr(vae, "added_by_a_newer_comfyui")
    # ... and then ours: the constructor's defaults (SD's 8x, 4 channels, cropping) do not survive.
    assert isinstance(vae.first_stage_model, MagvitVAE)
    assert (vae.latent_channels, vae.latent_dim, vae.crop_input) == (16, 3, False)
    assert vae.spacial_compression_decode() == 8 and vae.temporal_compression_decode() == 4
    assert "No VAE weights detected" not in caplog.text  # the empty-constructor warning is dropped
