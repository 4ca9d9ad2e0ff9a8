"""Checkpoint loading: layouts, sharding, dtype, memory, and a clear error for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from easyanimate_core.loading import detect_vae, inspect_checkpoint, load_transformer, load_vae
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig
from tests.manifest import manifest

CFG = TransformerConfig(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    num_layers=3,
    mmdit_layers=2,
    time_embed_dim=8,
    text_embed_dim=12,
    add_norm_text_encoder=True,
)


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    model = EasyAnimateTransformer3D(CFG)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write(path: Path, sd: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, path)
    return path


def test_loads_bit_exact_and_builds_on_meta(tmp_path, state_dict):
    model = load_transformer(write(tmp_path / "m.safetensors", state_dict))
    assert not any(p.is_meta for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_dict[k]), k
    assert model.info.config == CFG


def test_target_dtype_conversion(tmp_path, state_dict):
    model = load_transformer(write(tmp_path / "m.safetensors", state_dict), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.proj_out.weight, state_dict["proj_out.weight"].bfloat16())


def test_sharded_folder_with_index(tmp_path, state_dict):
    keys = sorted(state_dict)
    folder = tmp_path / "root" / "transformer"
    halves = {"a-00001-of-00002.safetensors": keys[::2], "a-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        write(folder / name, {k: state_dict[k] for k in ks})
    weight_map = {k: name for name, ks in halves.items() for k in ks}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_transformer(tmp_path / "root")
    assert torch.equal(model.proj.weight, state_dict["proj.weight"])
    assert len(model.info.files) == 2


def test_wrapper_prefix_is_stripped(tmp_path, state_dict):
    path = write(tmp_path / "m.safetensors", {"model.diffusion_model." + k: v for k, v in state_dict.items()})
    assert torch.equal(load_transformer(path).proj.weight, state_dict["proj.weight"])


def test_config_json_beside_a_single_file_supplies_what_tensors_cannot(tmp_path, state_dict):
    path = write(tmp_path / "m.safetensors", state_dict)
    (tmp_path / "config.json").write_text(json.dumps({"norm_eps": 1e-6, "num_layers": 99}))
    model = load_transformer(path)
    assert model.config.norm_eps == 1e-6
    assert model.config.num_layers == 3  # tensors win over a wrong config
    assert any("num_layers=99" in n for n in model.info.notes)


def test_inspect_summarises_without_loading(tmp_path, state_dict):
    info = inspect_checkpoint(write(tmp_path / "m.safetensors", state_dict))
    assert (info.kind, info.version, info.variant, info.layout) == ("transformer", "V5.1", "custom", "official")
    assert "EasyAnimate V5.1 transformer" in info.summary() and "F32" in info.summary()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not even read")
    with pytest.raises(ValueError, match="refusing to load a pickle-based checkpoint"):
        load_transformer(path)
    folder = tmp_path / "dir" / "transformer"
    folder.mkdir(parents=True)
    (folder / f"diffusion_pytorch_model{suffix}").write_bytes(b"x")
    with pytest.raises(ValueError, match="unpickling can run arbitrary code"):
        load_transformer(tmp_path / "dir")


def test_truncated_file_names_the_file(tmp_path, state_dict):
    path = write(tmp_path / "cut.safetensors", state_dict)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"cut\.safetensors: truncated"):
        load_transformer(path)


@pytest.mark.parametrize("content", [b"\x00" * 4, b"\xff" * 64, (20).to_bytes(8, "little") + b"{not json at all!!}"])
def test_corrupt_file_names_the_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a readable safetensors file"):
        load_transformer(path)


def test_missing_key_names_key_and_file(tmp_path, state_dict):
    sd = dict(state_dict)
    del sd["transformer_blocks.1.ff.net.2.weight"]
    with pytest.raises(
        ValueError, match=r"m\.safetensors: missing 1 tensor.*transformer_blocks\.1\.ff\.net\.2\.weight"
    ):
        load_transformer(write(tmp_path / "m.safetensors", sd))


def test_unexpected_key_names_key_and_file(tmp_path, state_dict):
    sd = {**state_dict, "transformer_blocks.0.extra.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"m\.safetensors: 1 unexpected tensor.*transformer_blocks\.0\.extra\.weight"):
        load_transformer(write(tmp_path / "m.safetensors", sd))


def test_wrong_shape_names_key_file_and_shapes(tmp_path, state_dict):
    sd = {**state_dict, "norm_out.linear.bias": torch.zeros(7)}
    with pytest.raises(
        ValueError, match=r"m\.safetensors: tensor norm_out\.linear\.bias has shape \[7\].*needs \[64\]"
    ):
        load_transformer(write(tmp_path / "m.safetensors", sd))


def test_unknown_tensors_say_what_was_found(tmp_path):
    path = write(tmp_path / "x.safetensors", {"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"these 2 tensors match no known EasyAnimate transformer \(found e\.g\. bar"):
        load_transformer(path)


def test_lora_and_vae_files_get_a_hint(tmp_path):
    lora = write(
        tmp_path / "l.safetensors", {"lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2)}
    )
    with pytest.raises(ValueError, match="looks like a LoRA"):
        load_transformer(lora)
    vae = write(
        tmp_path / "v.safetensors", {"encoder.conv_in.weight": torch.zeros(2), "decoder.conv_out.bias": torch.zeros(1)}
    )
    with pytest.raises(ValueError, match="looks like a VAE"):
        load_transformer(vae)


def test_v4_transformer_is_recognised(tmp_path):
    path = write(
        tmp_path / "v4.safetensors", {"text_embedding_padding": torch.zeros(3, 2), "blocks.0.x": torch.zeros(1)}
    )
    with pytest.raises(ValueError, match=r"EasyAnimate V4 \(HunyuanDiT-based\) transformer"):
        load_transformer(path)


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        load_transformer(tmp_path / "nope")


def test_peak_ram_stays_near_one_copy_in_the_target_dtype(tmp_path):
    """Load a ~256 MB fp32 checkpoint as bf16 in a fresh process: RSS grows by about 128 MB, not 2-3x."""
    cfg = TransformerConfig(
        num_attention_heads=8, attention_head_dim=64, num_layers=4, mmdit_layers=4, text_embed_dim=64, in_channels=16
    )
    model = EasyAnimateTransformer3D(cfg)
    path = write(tmp_path / "big.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    bf16_bytes = sum(v.numel() for v in model.state_dict().values()) * 2
    del model
    # VmHWM (not ru_maxrss, which Linux carries across exec from the forking pytest process).
    script = textwrap.dedent(
        f"""
        import torch
        from easyanimate_core.loading import load_transformer
        def status(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
        before = status("VmRSS")
        m = load_transformer({str(path)!r}, dtype=torch.bfloat16)
        print(status("VmHWM") - before)
        """
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 1.3 * bf16_bytes, f"peak RSS grew {growth / 2**20:.0f} MiB for {bf16_bytes / 2**20:.0f} MiB of bf16"


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------

VAE_MANIFESTS = {
    "vae_v4_guess": ("V4", "slice", "3d"),
    "vae_v5": ("V5", "mag", "spatial"),
    "vae_v51": ("V5.1", "mag", None),
}


@pytest.mark.parametrize("name", list(VAE_MANIFESTS))
def test_vae_detection_from_release_shapes(name):
    version, mode, attention = VAE_MANIFESTS[name]
    info = detect_vae(manifest(name), [Path("vae.safetensors")], {})
    assert (info.version, info.variant, info.config.mid_block_attention) == (version, mode, attention)
    assert info.config.block_out_channels == (128, 256, 512, 512)
    assert info.config.latent_channels == (4 if version == "V4" else 16)


def test_vae_config_json_overrides_the_release_defaults():
    config = {"scaling_factor": 0.5, "cache_compression_vae": True, "spatial_group_norm": False}
    info = detect_vae(manifest("vae_v51"), [Path("vae.safetensors")], config)
    assert (info.config.scaling_factor, info.config.temporal_mode, info.config.spatial_group_norm) == (
        0.5,
        "slice",
        False,
    )


def test_vae_loads_from_diffusers_official_and_single_file(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the parity reference")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLMagvit(
        latent_channels=16, block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=4
    ).eval()
    ref.save_pretrained(tmp_path / "diffusers" / "vae")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    write(tmp_path / "official" / "vae" / "diffusion_pytorch_model.safetensors", sd)
    (tmp_path / "official" / "vae" / "config.json").write_text(
        json.dumps({**dict(ref.config), "cache_mag_vae": True, "mini_batch_encoder": 4, "mini_batch_decoder": 1})
    )
    single = write(tmp_path / "single" / "vae.safetensors", sd)
    with pytest.raises(ValueError, match="put its config.json \\(with norm_num_groups\\) beside the file"):
        load_vae(single)
    (tmp_path / "single" / "vae.json").write_text(json.dumps(dict(ref.config)))
    z = torch.randn(1, 16, 2, 4, 4)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        expected = {"mean": posterior.mean, "logvar": posterior.logvar, "decode": ref.decode(z).sample}
    for path in (tmp_path / "diffusers", tmp_path / "official", single):
        vae = load_vae(path)
        assert vae.info.kind == "vae" and vae.info.version == "V5.1"
        with torch.no_grad():
            mean, logvar = vae.encode(video)
            got = {"mean": mean, "logvar": logvar, "decode": vae.decode(z)}
        for name, ref_value in expected.items():
            err, scale = (got[name] - ref_value).abs().max(), ref_value.abs().max()
            assert err <= 1e-5 * scale, f"{path} {name}: max|ours-ref| {err:.3g} > 1e-5 * {scale:.3g}"


def test_vae_loader_refuses_a_transformer(tmp_path, state_dict):
    with pytest.raises(ValueError, match="looks like a transformer"):
        load_vae(write(tmp_path / "t.safetensors", state_dict))


def test_inspect_reports_the_weight_dtype_that_loading_keeps(tmp_path, state_dict):
    path = write(tmp_path / "m.safetensors", {k: v.to(torch.bfloat16) for k, v in state_dict.items()})
    assert inspect_checkpoint(path).weight_dtype == torch.bfloat16
    assert load_transformer(path).proj_out.weight.dtype == torch.bfloat16
