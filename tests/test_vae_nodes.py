"""The EasyAnimate VAE as ComfyUI's VAE type, its loader, decode / encode nodes and latent previews (stand-in);
the MagViT VAE (V4-V5.1) and V1's per-frame image VAE."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import easyanimate_core.image_vae as image_vae
import easyanimate_core.preview as preview
from easyanimate_core.image_vae import ImageVAE, ImageVAEConfig
from easyanimate_core.vae import MagvitVAE, decode_memory, plan_decode
from tests.comfy_standin import install, link_tree
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


# ---- V1's image VAE (the SD AutoencoderKL, frame by frame) ------------------------------------------------

# A tiny diffusers-style AutoencoderKL: 2 levels (2x compression), 1 resnet per level, 4 norm groups, 4 channels.
IMAGE_VAE_JSON = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "scaling_factor": 0.18215,
}


def write_tiny_image_vae(root: Path) -> Path:
    """A V1 model folder ``root`` holding only vae/ (diffusers names, config.json), random weights of std 0.3."""
    model = ImageVAE(ImageVAEConfig.from_dict(IMAGE_VAE_JSON))
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.state_dict().items()}
    (root / "vae").mkdir(parents=True)
    save_file(state, root / "vae" / "diffusion_pytorch_model.safetensors")
    (root / "vae" / "config.json").write_text(json.dumps(IMAGE_VAE_JSON))
    return root


@pytest.fixture(scope="module")
def image_vae_folder(tmp_path_factory):
    return write_tiny_image_vae(tmp_path_factory.mktemp("tiny") / "v1")


def load_v1(nodes, image_vae_folder):
    link_tree(image_vae_folder, nodes.models / "tiny-V1")
    return nodes.nodes.EasyAnimateVAELoader().load("tiny-V1")[0]


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_loader_lists_and_loads_v1_image_vaes_from_a_folder_and_a_single_file(nodes, image_vae_folder, tmp_path):
    link_tree(image_vae_folder, nodes.models / "tiny-V1")
    folder = vae_folder(nodes, tmp_path)
    shutil.copy(image_vae_folder / "vae" / "diffusion_pytorch_model.safetensors", folder / "sd.safetensors")
    (folder / "sd.json").write_text(json.dumps(IMAGE_VAE_JSON))  # 4 norm groups: not the SD default of 32
    loader = nodes.nodes.EasyAnimateVAELoader
    assert loader.INPUT_TYPES()["required"]["model_folder"][0] == ["tiny-V1", "sd.safetensors"]
    assert loader.VALIDATE_INPUTS("tiny-V1") is True and loader.VALIDATE_INPUTS("sd.safetensors") is True
    vae = loader().load("tiny-V1")[0]
    single = loader().load("sd.safetensors")[0]
    core = nodes.package.vae_nodes.easyanimate_vae(vae)
    assert isinstance(core, ImageVAE) and isinstance(vae, sys.modules["comfy.sd"].VAE)
    assert core.config.norm_num_groups == 4 and vae.patcher.model is core
    for (k, a), b in zip(single.get_sd().items(), core.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # The attributes stock nodes read: 4 channels, one latent per frame, 2x2 pixels per latent (this tiny VAE).
    assert (vae.latent_channels, vae.latent_dim, vae.output_channels) == (4, 3, 3)
    assert vae.downscale_ratio[0](7) == 7 and vae.upscale_ratio[0](7) == 7
    assert vae.spacial_compression_decode() == vae.spacial_compression_encode() == 2
    assert vae.temporal_compression_decode() == 1
    shape = (1, 4, 5, 8, 8)
    assert vae.memory_used_decode(shape, torch.float32) == image_vae.decode_memory(core.config, shape, torch.float32)


def test_v1_decode_and_encode_nodes_equal_the_image_vae(nodes, image_vae_folder):
    vae = load_v1(nodes, image_vae_folder)
    core = vae.first_stage_model
    z = latents((2, 4, 3, 4, 6))
    (image,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae, 2)
    assert nodes.mm.loads == [[vae.patcher]]
    assert image.shape == (2 * 3, 8, 12, 3)  # one frame per latent frame
    torch.testing.assert_close(image, core_frames(core, z, chunk_latents=2), rtol=0, atol=0)
    (auto,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae)  # planned: all 3 frames per call
    torch.testing.assert_close(auto, core_frames(core, z, chunk_latents=3), rtol=0, atol=0)
    assert rel(auto, core_frames(core, z)) <= 1e-5  # the official one frame per call, up to float summation order
    # Any frame count encodes (no 4k+1 rule); the LATENT is the posterior mean of [-1, 1] pixels.
    pixels = torch.rand(3, 16, 32, 3, generator=torch.Generator().manual_seed(1))
    (out,) = nodes.nodes.EasyAnimateVAEEncode().encode(pixels, vae, 4, 0, 64)
    with torch.no_grad():
        mean, _ = core.encode(pixels.permute(3, 0, 1, 2)[None] * 2 - 1, chunk_frames=4)
    assert out["samples"].shape == (1, 4, 3, 8, 16)
    torch.testing.assert_close(out["samples"], mean, rtol=0, atol=0)


def test_v1_stock_vae_methods_equal_the_nodes(nodes, image_vae_folder):
    """VAEDecode / VAEDecodeTiled / VAEEncode / VAEEncodeTiled on a V1 VAE."""
    vae = load_v1(nodes, image_vae_folder)
    core = vae.first_stage_model
    z = latents((1, 4, 2, 16, 16))
    (node,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae)
    stock = vae.decode(z)
    assert stock.shape == (1, 2, 32, 32, 3)
    torch.testing.assert_close(stock.reshape(-1, 32, 32, 3), node, rtol=0, atol=0)
    # VAEDecodeTiled(tile_size=16, overlap=4, temporal_size=1) on 2x compression: 8 / 2 latent pixels, 1 frame.
    tiled = vae.decode_tiled(z, tile_x=8, tile_y=8, overlap=2, tile_t=1, overlap_t=0)
    expected = core_frames(core, z, chunk_latents=1, tile_latent_size=8, tile_overlap=2)
    torch.testing.assert_close(tiled.reshape(-1, 32, 32, 3), expected, rtol=0, atol=0)
    assert not torch.equal(tiled.reshape(-1, 32, 32, 3), node)  # it did tile
    pixels = node  # 2 frames [2, 32, 32, 3]: not 4k+1, fine for an image VAE
    (encoded,) = nodes.nodes.EasyAnimateVAEEncode().encode(pixels, vae)
    torch.testing.assert_close(vae.encode(pixels), encoded["samples"], rtol=0, atol=0)
    # VAEEncodeTiled: 16 px tiles, 4 px overlap, 1 frame per call -> 8 / 2 latent pixels.
    stock_tiled = vae.encode_tiled(pixels, tile_x=16, tile_y=16, overlap=4, tile_t=1, overlap_t=0)
    with torch.no_grad():
        mean, _ = core.encode(pixels.permute(3, 0, 1, 2)[None] * 2 - 1, chunk_frames=1, tile_latent_size=8,
                              tile_overlap=2)  # fmt: skip
    torch.testing.assert_close(stock_tiled, mean, rtol=0, atol=0)


def test_v1_decode_refuses_16_channel_latents(nodes, image_vae_folder):
    vae = load_v1(nodes, image_vae_folder)
    with pytest.raises(ValueError, match=r"expected video latents \[B, 4, T, h, w\], got \[1, 16, 2, 4, 4\]"):
        nodes.nodes.EasyAnimateVAEDecode().decode({"samples": torch.zeros(1, 16, 2, 4, 4)}, vae)
    with pytest.raises(ValueError, match="EasyAnimate VAE Encode: height 40 is not a multiple of 16; nearest valid"):
        nodes.nodes.EasyAnimateVAEEncode().encode(torch.zeros(3, 40, 32, 3), vae)
    assert nodes.mm.loads == []  # refused before the VAE was loaded


def record_calls(monkeypatch, core, method: str, fail_first: int = 0) -> list:
    """Patch ``core.<method>`` to record (frames per call, tile) and raise out-of-memory on the first calls."""
    calls, real = [], getattr(core, method)
    chunk_name = "chunk_latents" if method == "decode" else "chunk_frames"

    def run(*args, **kwargs):
        calls.append((kwargs.get(chunk_name), kwargs.get("tile_latent_size")))
        if len(calls) <= fail_first:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(core, method, run)
    return calls


def test_v1_short_memory_plans_fewer_frames_per_call_then_tiles(nodes, image_vae_folder, monkeypatch):
    vae = load_v1(nodes, image_vae_folder)
    core = vae.first_stage_model
    z = latents((1, 4, 6, 12, 16))
    out_bytes = 6 * 24 * 32 * 3 * 4  # the IMAGE output on the same device (CPU) is taken off the budget
    calls = record_calls(monkeypatch, core, "decode")
    one_frame = image_vae.decode_memory(core.config, z.shape, torch.float32, 1)
    # Budget for 2 of the 6 frames: untiled, 2 frames per call (all 6 would fit in 64 GiB).
    nodes.mm.free_memory = 2 * one_frame + out_bytes
    (image,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae)
    assert calls == [(2, None)]
    torch.testing.assert_close(image, core_frames(core, z, chunk_latents=2), rtol=0, atol=0)
    # Budget for 60% of one frame: one frame per call in tiles of 10x10 latent pixels (100 <= 0.6 * 192 < 121).
    calls.clear()
    nodes.mm.free_memory = int(0.6 * one_frame) + out_bytes
    (image,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae)
    assert calls == [(1, 10)]
    torch.testing.assert_close(image, core_frames(core, z, tile_latent_size=10), rtol=0, atol=0)
    # Encode plans the same way, in pixels: 3 of 6 frames per call fit.
    pixels = torch.rand(6, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    one_image = image_vae.encode_memory(core.config, (1, 3, 6, 16, 16), torch.float32, 1)
    nodes.mm.free_memory = 3 * one_image
    calls = record_calls(monkeypatch, core, "encode")
    nodes.nodes.EasyAnimateVAEEncode().encode(pixels, vae)
    assert calls == [(3, None)]


def test_v1_out_of_memory_retries_with_fewer_frames_then_tiles(nodes, image_vae_folder, monkeypatch, caplog):
    vae = load_v1(nodes, image_vae_folder)
    core = vae.first_stage_model
    z = latents((1, 4, 4, 8, 16))
    calls = record_calls(monkeypatch, core, "decode", fail_first=3)
    (image,) = nodes.nodes.EasyAnimateVAEDecode().decode({"samples": z}, vae)
    # Planned: all 4 frames per call; then 2, then 1 (same frames, no seams), then 8x8 tiles.
    assert calls == [(4, None), (2, None), (1, None), (1, 8)]
    assert "ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); retrying with chunk 2" in caplog.text
    torch.testing.assert_close(image, core_frames(core, z, chunk_latents=1, tile_latent_size=8), rtol=0, atol=0)
    calls = record_calls(monkeypatch, core, "encode", fail_first=1)
    pixels = torch.rand(4, 16, 32, 3, generator=torch.Generator().manual_seed(4))
    (out,) = nodes.nodes.EasyAnimateVAEEncode().encode(pixels, vae)
    assert calls == [(4, None), (2, None)]
    with torch.no_grad():
        mean, _ = core.encode(pixels.permute(3, 0, 1, 2)[None] * 2 - 1, chunk_frames=2)
    torch.testing.assert_close(out["samples"], mean, rtol=0, atol=0)
