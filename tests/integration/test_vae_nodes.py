"""The EasyAnimate VAE in a real ComfyUI: stock VAEDecode / VAEDecodeTiled / VAEEncode, out-of-memory retry,
latent previews while the stock KSampler samples, and refusals naming the fix; the same for V1's image VAE."""

from __future__ import annotations

import shutil

import pytest
from comfy_harness import PACK_IMPORT_SCRIPT, ComfyError, run_in_comfy_python
from safetensors.torch import save_file

from tests.test_vae_nodes import write_tiny_image_vae
from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration

FOLDER = "tiny-vae-v51"
FOLDER_V1 = "tiny-vae-v1"

VAE_SCRIPT = (
    PACK_IMPORT_SCRIPT
    + r"""
import logging
import folder_paths
work = tempfile.mkdtemp()
import comfy.model_management as mm
import comfy.sd
import comfy.utils
import latent_preview
import nodes as comfy_nodes
from comfy.cli_args import LatentPreviewMethod, args
from easyanimate_core import preview
from easyanimate_pack.nodes.native_model import load_native_model
ours = sys.modules["easyanimate_pack.nodes.vae_nodes"]
loaders = sys.modules["easyanimate_pack.nodes.loaders"]

root = work + "/models/EasyAnimate/tiny"
write_tiny_checkpoint(root, "InP", version="V5.1")
folder_paths.add_model_folder_path("EasyAnimate", work + "/models/EasyAnimate", is_default=True)
vae = ours.EasyAnimateVAELoader().load("tiny")[0]
core = vae.first_stage_model
res = {"is_comfy_vae": isinstance(vae, comfy.sd.VAE), "vae_dtype": str(vae.vae_dtype)}

def diff(a, b):
    return (a.float() - b.float()).abs().max().item()

g = torch.Generator().manual_seed(0)
z = torch.randn(1, 16, 3, 12, 12, generator=g)  # 9 frames of 96x96
(node,) = ours.EasyAnimateVAEDecode().decode({"samples": z}, vae)
(stock,) = comfy_nodes.VAEDecode().decode(vae, {"samples": z})
res["decode_shapes"] = [list(node.shape), list(stock.shape)]
res["decode_diff"] = diff(stock, node)
with torch.no_grad():
    reference = ((core.decode(z) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 3, 0)
res["decode_vs_core"] = diff(node, reference)

# VAEDecodeTiled(tile 64 px, overlap 16 px, 8 frames per chunk) -> 8 / 2 latent pixels, 2 latents: 2x2 tiles.
(tiled,) = comfy_nodes.VAEDecodeTiled().decode(vae, {"samples": z}, 64, 16, 8, 4)
(tiled_node,) = ours.EasyAnimateVAEDecode().decode({"samples": z}, vae, 2, 64, 16)
res["tiled_shape"] = list(tiled.shape)
res["tiled_diff"] = diff(tiled, tiled_node)
res["tiled_vs_untiled"] = diff(tiled, node)

# Stock VAEEncode on the decoded frames against our encode node.
(latent,) = comfy_nodes.VAEEncode().encode(vae, node)
(latent_node,) = ours.EasyAnimateVAEEncode().encode(node, vae)
res["encode_shape"] = list(latent["samples"].shape)
res["encode_diff"] = diff(latent["samples"], latent_node["samples"])

# A forced out-of-memory error on the first full-size decode: stock VAEDecode still returns the frames.
real_decode, attempts = core.decode, []
def decode_or_oom(*a, **kw):
    attempts.append([kw.get("chunk_latents"), kw.get("tile_latent_size")])
    if len(attempts) == 1:
        raise mm.OOM_EXCEPTION("CUDA out of memory. Tried to allocate 24.00 GiB")
    return real_decode(*a, **kw)
core.decode = decode_or_oom
z16 = torch.randn(1, 16, 2, 16, 16, generator=g)
records = []
handler = logging.Handler()
handler.emit = lambda record: records.append(record.getMessage())
logging.getLogger().addHandler(handler)
(recovered,) = comfy_nodes.VAEDecode().decode(vae, {"samples": z16})
core.decode = real_decode
res["oom_attempts"] = attempts
res["oom_shape"] = list(recovered.shape)
res["oom_logged"] = any("ran out of memory" in m for m in records)
with torch.no_grad():
    tiled_ref = ((core.decode(z16, tile_latent_size=attempts[-1][1]) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 3, 0)
res["oom_diff"] = diff(recovered, tiled_ref)

# Every public attribute and method of the running ComfyUI's VAE (class and what its constructor sets) exists on
# ours; each is called with the arguments it takes (tiling helpers with their defaults on a small latent / video).
real = comfy.sd.VAE(sd={})  # ComfyUI's own constructor with no weights: the attributes it sets
public = sorted(n for n in set(dir(comfy.sd.VAE)) | set(vars(real)) if not n.startswith("_"))
res["vae_public"] = public
res["vae_missing"] = [n for n in public if not hasattr(vae, n)]
z_small, pixels = torch.randn(1, 16, 2, 4, 4, generator=g), torch.rand(5, 32, 32, 3, generator=g)
video = pixels.movedim(-1, 0).unsqueeze(0)  # [1, 3, F, H, W] in [0, 1], as ComfyUI's encode_tiled passes it
arguments = {"decode": (z_small,), "decode_tiled": (z_small,), "encode": (pixels,), "encode_tiled": (pixels,),
             "vae_encode_crop_pixels": (pixels,), "decode_tiled_3d": (z_small,), "encode_tiled_3d": (video,)}
calls, call_errors = {}, {}
for n in public:
    attribute = getattr(vae, n, None)
    if not callable(getattr(comfy.sd.VAE, n, None)) or n.endswith("_1d"):  # methods; 1-D tiling is for audio
        continue
    if n in ("decode_tiled_", "encode_tiled_"):  # ComfyUI's 2-D image tiling: for 4-D image models only
        continue
    try:
        out = attribute(*arguments.get(n, ()))
        plain = out if isinstance(out, (int, float, type(None))) else type(out).__name__
        calls[n] = list(out.shape) if isinstance(out, torch.Tensor) else plain
    except Exception as e:
        call_errors[n] = f"{type(e).__name__}: {e}"[:300]
res["vae_calls"], res["vae_call_errors"] = calls, call_errors
if hasattr(comfy.sd.VAE, "model_size"):
    res["vae_model_size"] = [vae.model_size(), mm.module_size(core)]

# Live previews: the stock KSampler on our MODEL with latent2rgb previews on.
args.preview_method = LatentPreviewMethod.Latent2RGB
model = load_native_model(root)
fmt = model.model.latent_format
te = loaders.EasyAnimateTextEncoderHandle(loaders.load_text_encoders(root, "v5.1"))
encode = loaders.EasyAnimateTextEncode().encode
positive, negative = encode(te, "a red fox")[0], encode(te, "blurry")[0]
previews = []
def hook(value, total, preview_image, node_id=None):
    previews.append(preview_image)
comfy.utils.set_progress_bar_global_hook(hook)
empty = {"samples": torch.zeros(1, 16, 2, 4, 8)}
comfy_nodes.KSampler().sample(model, 1, 3, 6.0, "euler", "simple", positive, negative, empty)
shown = [p for p in previews if p is not None]
res["previews"] = len(shown)
res["preview_kind"] = [shown[0][0], list(shown[0][1].size)] if shown else None
res["previewer"] = type(latent_preview.get_previewer(torch.device("cpu"), fmt)).__name__

# Factors against decoded colours: held-out smooth latents (VAE space) -> block-averaged decoded colours, and the
# preview ComfyUI's previewer makes from the same latents in model space (x scaling factor), back in [-1, 1].
fit = preview.latent_rgb_for_checkpoint(root)
held_out = preview.smooth_latents(2, 16, 8, 1 / core.config.scaling_factor, torch.Generator().manual_seed(7))
decoded = preview.pooled_colours(core, held_out)  # [2, 3, 8, 8]
previewer = latent_preview.get_previewer(torch.device("cpu"), fmt)
def shown_colours(i):
    image = previewer.decode_latent_to_preview((held_out[i : i + 1] * fmt.scale_factor).float())
    return torch.tensor(list(image.getdata()), dtype=torch.float32).reshape(8, 8, 3).permute(2, 0, 1) / 255 * 2 - 1
shown_rgb = torch.stack([shown_colours(i) for i in range(2)])
predicted = (torch.einsum("nchw,cr->nrhw", held_out[:, :, 0].double(), torch.tensor(fit.factors).double())
             + torch.tensor(fit.bias).double()[None, :, None, None]).clamp(-1, 1)
res["preview_vs_fit"] = diff(shown_rgb, predicted)
res["preview_vs_decoded_rms"] = (shown_rgb - decoded.clamp(-1, 1)).pow(2).mean().sqrt().item()
res["fit_rms"] = fit.rms_error
res["colour_rms"] = fit.colour_rms
print(json.dumps(res))
"""
)


@pytest.fixture(scope="module")
def vae_results():
    return run_in_comfy_python(VAE_SCRIPT, "COMFYUI_PATH is not set: no ComfyUI to run the VAE checks in")


# V1's image VAE (tests/test_vae_nodes.py's tiny AutoencoderKL: 2x compression, 4 channels, frame by frame), the
# folder written by the test process (V1_SOURCE) and copied into the script's models/EasyAnimate/.
V1_VAE_SCRIPT = (
    PACK_IMPORT_SCRIPT
    + r"""
import shutil
import folder_paths
work = tempfile.mkdtemp()
import comfy.model_management as mm
import comfy.sd
import nodes as comfy_nodes
ours = sys.modules["easyanimate_pack.nodes.vae_nodes"]

shutil.copytree(V1_SOURCE, work + "/models/EasyAnimate/tiny-v1")
folder_paths.add_model_folder_path("EasyAnimate", work + "/models/EasyAnimate", is_default=True)
vae = ours.EasyAnimateVAELoader().load("tiny-v1")[0]
core = vae.first_stage_model
res = {"is_comfy_vae": isinstance(vae, comfy.sd.VAE), "core": type(core).__name__}
real_decode, real_encode, decodes, encodes, failures = core.decode, core.encode, [], [], []

def decode(*a, **kw):  # records (frames per call, tile) and raises comfy's OOM while failures are queued
    decodes.append([kw.get("chunk_latents"), kw.get("tile_latent_size")])
    if failures:
        raise mm.OOM_EXCEPTION(failures.pop())
    return real_decode(*a, **kw)

def encode(*a, **kw):
    encodes.append([kw.get("chunk_frames"), kw.get("tile_latent_size")])
    return real_encode(*a, **kw)

core.decode, core.encode = decode, encode

def diff(a, b):
    return (a.float() - b.float()).abs().max().item()

def frames(video):  # [1, 3, F, H, W] in [-1, 1] -> IMAGE [F, H, W, 3]
    return ((video + 1) / 2).clamp(0, 1)[0].permute(1, 2, 3, 0)

g = torch.Generator().manual_seed(0)
z = torch.randn(1, 4, 3, 40, 40, generator=g)  # 3 frames of 80x80
(node,) = ours.EasyAnimateVAEDecode().decode({"samples": z}, vae)
(stock,) = comfy_nodes.VAEDecode().decode(vae, {"samples": z})
res["decode_shapes"] = [list(node.shape), list(stock.shape)]
res["decode_diff"] = diff(stock, node)
with torch.no_grad():
    res["decode_vs_core"] = diff(node, frames(real_decode(z, chunk_latents=decodes[0][0])))
    res["decode_vs_one_frame_per_call"] = diff(node, frames(real_decode(z)))

# VAEDecodeTiled(tile 64 px, overlap 16 px, 8 frames per chunk) -> 32 / 8 latent pixels: 2x2 tiles.
(tiled,) = comfy_nodes.VAEDecodeTiled().decode(vae, {"samples": z}, 64, 16, 8, 4)
(tiled_node,) = ours.EasyAnimateVAEDecode().decode({"samples": z}, vae, 8, 64, 16)
res["tiled_shape"] = list(tiled.shape)
res["tiled_diff"] = diff(tiled, tiled_node)
res["tiled_vs_untiled"] = diff(tiled, node)

# Stock VAEEncode on the 3 decoded frames (no 4k+1 rule) against our encode node and the core's posterior mean.
encodes.clear()
(latent,) = comfy_nodes.VAEEncode().encode(vae, node)
(latent_node,) = ours.EasyAnimateVAEEncode().encode(node, vae)
res["encode_shape"] = list(latent["samples"].shape)
res["encode_diff"] = diff(latent["samples"], latent_node["samples"])
with torch.no_grad():
    mean, _ = real_encode(node.permute(3, 0, 1, 2)[None] * 2 - 1, chunk_frames=encodes[0][0])
res["encode_vs_core"] = diff(latent_node["samples"], mean)

# Forced out-of-memory errors on the first two decodes: fewer frames per call, then one, and the frames come back.
decodes.clear()
failures[:] = ["CUDA out of memory. Tried to allocate 24.00 GiB"] * 2
z4 = torch.randn(1, 4, 4, 16, 16, generator=g)
(recovered,) = comfy_nodes.VAEDecode().decode(vae, {"samples": z4})
res["oom_attempts"] = list(decodes)
res["oom_shape"] = list(recovered.shape)
with torch.no_grad():
    res["oom_diff"] = diff(recovered, frames(real_decode(z4, chunk_latents=1)))

# Every public method of the running ComfyUI's VAE works on ours over the image VAE (as the MagViT check above).
real = comfy.sd.VAE(sd={})
public = sorted(n for n in set(dir(comfy.sd.VAE)) | set(vars(real)) if not n.startswith("_"))
res["vae_missing"] = [n for n in public if not hasattr(vae, n)]
z_small, pixels = torch.randn(1, 4, 2, 8, 8, generator=g), torch.rand(3, 32, 32, 3, generator=g)
video = pixels.movedim(-1, 0).unsqueeze(0)
arguments = {"decode": (z_small,), "decode_tiled": (z_small,), "encode": (pixels,), "encode_tiled": (pixels,),
             "vae_encode_crop_pixels": (pixels,), "decode_tiled_3d": (z_small,), "encode_tiled_3d": (video,)}
calls, call_errors = {}, {}
for n in public:
    if not callable(getattr(comfy.sd.VAE, n, None)) or n.endswith("_1d") or n in ("decode_tiled_", "encode_tiled_"):
        continue
    try:
        out = getattr(vae, n)(*arguments.get(n, ()))
        plain = out if isinstance(out, (int, float, type(None))) else type(out).__name__
        calls[n] = list(out.shape) if isinstance(out, torch.Tensor) else plain
    except Exception as e:
        call_errors[n] = f"{type(e).__name__}: {e}"[:300]
res["vae_calls"], res["vae_call_errors"] = calls, call_errors
print(json.dumps(res))
"""
)


@pytest.fixture(scope="module")
def v1_results(tmp_path_factory):
    source = write_tiny_image_vae(tmp_path_factory.mktemp("v1_vae") / "tiny-v1")
    script = f"V1_SOURCE = {str(source)!r}\n" + V1_VAE_SCRIPT
    return run_in_comfy_python(script, "COMFYUI_PATH is not set: no ComfyUI to run the V1 VAE checks in")


def test_loader_gives_comfys_vae_type(vae_results):
    assert vae_results["is_comfy_vae"]


def test_every_public_attribute_and_method_of_comfys_vae_works_on_ours(vae_results):
    assert len(vae_results["vae_public"]) > 20, vae_results["vae_public"]  # ComfyUI's list, not an empty one
    assert vae_results["vae_missing"] == []
    assert vae_results["vae_call_errors"] == {}
    calls = vae_results["vae_calls"]
    assert calls["decode"] == [1, 5, 32, 32, 3] and calls["encode"] == [1, 16, 2, 4, 4]
    assert calls["encode_tiled_3d"] == calls["encode"]
    assert calls["spacial_compression_decode"] == 8 and calls["temporal_compression_decode"] == 4
    if "vae_model_size" in vae_results:  # ComfyUI 0.8.0+: model_size() / get_ram_usage() count our weights
        ours, expected = vae_results["vae_model_size"]
        assert ours == expected > 0 and calls["get_ram_usage"] == expected


def test_stock_vae_decode_equals_our_node(vae_results):
    # Both call the same chunked decode (exact: 0 difference); 3 latents -> 9 frames of 96x96, IMAGE layout.
    assert vae_results["decode_shapes"] == [[9, 96, 96, 3], [9, 96, 96, 3]]
    assert vae_results["decode_diff"] == 0.0
    assert vae_results["decode_vs_core"] == 0.0


def test_stock_vae_decode_tiled_equals_our_node_with_the_same_tiles(vae_results):
    assert vae_results["tiled_shape"] == [9, 96, 96, 3]
    assert vae_results["tiled_diff"] == 0.0
    # It did tile: per-frame GroupNorm sees a tile's statistics, so tiles differ from the untiled decode.
    assert vae_results["tiled_vs_untiled"] > 0.0


def test_stock_vae_encode_equals_our_node(vae_results):
    assert vae_results["encode_shape"] == [1, 16, 3, 12, 12]
    assert vae_results["encode_diff"] == 0.0


def test_forced_out_of_memory_retries_with_tiles_and_returns_the_frames(vae_results):
    # First attempt untiled (planned from free RAM) raises comfy's OOM; the retry tiles at 8 latent pixels.
    assert vae_results["oom_attempts"] == [[1, None], [1, 8]]
    assert vae_results["oom_shape"] == [5, 128, 128, 3]
    assert vae_results["oom_logged"]
    assert vae_results["oom_diff"] == 0.0


def test_v1_image_vae_works_through_stock_decode_tiled_decode_and_encode(v1_results):
    assert v1_results["is_comfy_vae"] and v1_results["core"] == "ImageVAE"
    # One frame per latent, 2x pixels; stock and node decode are the same call (exact), and equal the core's
    # decode with the planned frames per call; the official one-frame-per-call order differs by float rounding.
    assert v1_results["decode_shapes"] == [[3, 80, 80, 3], [3, 80, 80, 3]]
    assert v1_results["decode_diff"] == 0.0 and v1_results["decode_vs_core"] == 0.0
    assert v1_results["decode_vs_one_frame_per_call"] <= 1e-5
    assert v1_results["tiled_shape"] == [3, 80, 80, 3]
    assert v1_results["tiled_diff"] == 0.0 and v1_results["tiled_vs_untiled"] > 0.0
    assert v1_results["encode_shape"] == [1, 4, 3, 40, 40]
    assert v1_results["encode_diff"] == 0.0 and v1_results["encode_vs_core"] == 0.0


def test_v1_out_of_memory_retries_with_fewer_frames_per_call(v1_results):
    # Planned from free RAM: all 4 frames per call; out of memory twice: 2 frames, then 1, untiled (no seams).
    assert v1_results["oom_attempts"] == [[4, None], [2, None], [1, None]]
    assert v1_results["oom_shape"] == [4, 32, 32, 3]
    assert v1_results["oom_diff"] == 0.0


def test_every_public_method_of_comfys_vae_works_on_a_v1_vae(v1_results):
    assert v1_results["vae_missing"] == [] and v1_results["vae_call_errors"] == {}
    calls = v1_results["vae_calls"]
    assert calls["decode"] == [1, 2, 16, 16, 3] and calls["encode"] == [1, 4, 3, 16, 16]
    assert calls["encode_tiled_3d"] == calls["encode"]
    assert calls["spacial_compression_decode"] == 2 and calls["temporal_compression_decode"] == 1


def test_ksampler_shows_latent_previews_from_factors_fitted_on_the_vae(vae_results):
    assert vae_results["previewer"] == "Latent2RGBPreviewer"
    assert vae_results["previews"] == 3  # one per step
    assert vae_results["preview_kind"] == ["JPEG", [8, 4]]  # first latent frame, one pixel per latent pixel
    # ComfyUI's previewer on model-space latents reproduces the VAE-space fit up to 8-bit rounding (1/255 on the
    # [0, 1] scale is 2/255 on [-1, 1]): the scaling and layout reach the previewer intact.
    assert vae_results["preview_vs_fit"] <= 2 / 255 + 1e-6
    # Against the colours the tiny VAE decodes (held-out latents): within 1.5x the fit's own RMS error plus
    # rounding. A random tiny VAE is far from linear (its fit error is close to the colour spread), so this is
    # the meaningful bound here; the fit's exactness on a linear decoder is a unit test (test_vae_planning).
    assert vae_results["preview_vs_decoded_rms"] <= 1.5 * vae_results["fit_rms"] + 2 / 255


# ---- through the server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_models(comfy_server):
    """Tiny model folders (V5.1, V1's image VAE) in models/EasyAnimate/, an EasyAnimate VAE file and an SD-style VAE
    file in models/vae/."""
    base = comfy_server.base_dir / "models"
    folder = base / "EasyAnimate" / FOLDER
    if not folder.is_dir():
        write_tiny_checkpoint(folder, "InP", version="V5.1")
    if not (base / "EasyAnimate" / FOLDER_V1).is_dir():
        write_tiny_image_vae(base / "EasyAnimate" / FOLDER_V1)
    vae_dir = base / "vae"
    vae_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", vae_dir / "tiny_easyanimate.safetensors")
    shutil.copy(folder / "vae" / "config.json", vae_dir / "tiny_easyanimate.json")
    import torch

    sd_like = {
        "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        "encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
        "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
        "quant_conv.weight": torch.zeros(8, 8, 1, 1),
        "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
    }
    save_file(sd_like, vae_dir / "sd_style_vae.safetensors")
    return folder


def encode_decode_prompt(vae_name: str, frames: int = 5, width: int = 32, height: int = 32) -> dict:
    """EmptyImage frames -> our encode -> stock VAEDecode -> SaveImage, with the VAE from our loader."""
    return {
        "1": {"class_type": "EasyAnimateVAELoader", "inputs": {"model_folder": vae_name}},
        "2": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": frames, "color": 0x3366CC},
        },
        "3": {"class_type": "EasyAnimateVAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "easyanimate_vae"}},
    }


@pytest.mark.parametrize(
    ("vae_name", "frames"), [(FOLDER, 5), ("tiny_easyanimate.safetensors", 5), (FOLDER_V1, 3)]
)  # V1's image VAE takes any frame count
def test_our_encode_and_stock_decode_run_through_the_server(comfy_server, vae_models, vae_name, frames):
    info = comfy_server.get_json("/object_info/EasyAnimateVAELoader")["EasyAnimateVAELoader"]
    assert info["output"] == ["VAE"]
    assert {FOLDER, FOLDER_V1, "tiny_easyanimate.safetensors", "sd_style_vae.safetensors"} <= set(
        info["input"]["required"]["model_folder"][0]
    )
    files = comfy_server.output_files(comfy_server.run_prompt(encode_decode_prompt(vae_name, frames), timeout=300))
    assert len(files) == frames and all(f.stat().st_size > 0 for f in files)


def test_another_vae_family_is_refused_at_validation_naming_the_fix(comfy_server, vae_models):
    with pytest.raises(ComfyError) as err:
        comfy_server.queue_prompt(encode_decode_prompt("sd_style_vae.safetensors"))
    text = str(err.value.payload)
    assert "vae/sd_style_vae.safetensors is not an EasyAnimate VAE" in text, text[:2000]
    assert "ComfyUI's VAELoader (Load VAE)" in text, text[:2000]


@pytest.mark.parametrize(
    ("frames", "width", "height", "expected"),
    [
        (10, 32, 32, "10 frames: the mag VAE expects 4k+1 frames; nearest valid: 9 or 13"),
        (5, 40, 32, "width 40 is not a multiple of 16; nearest valid: 32 or 48"),
    ],
)
def test_bad_frame_counts_and_sizes_fail_the_prompt_naming_the_nearest_valid(
    comfy_server, vae_models, frames, width, height, expected
):
    with pytest.raises(ComfyError) as err:
        comfy_server.run_prompt(encode_decode_prompt(FOLDER, frames, width, height), timeout=300)
    assert expected in str(err.value), str(err.value)[:2000]
