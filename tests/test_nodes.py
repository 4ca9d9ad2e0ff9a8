"""The EasyAnimate nodes without ComfyUI, against the stand-in of tests/comfy_standin.py."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import easyanimate_core.ops
from easyanimate_core.sampling import flow_sigmas
from easyanimate_core.transformer import EasyAnimateTransformer3D
from tests.comfy_standin import CPU, install, link_tree


def mappings_are_complete(nodes) -> None:
    mapping = nodes.package.NODE_CLASS_MAPPINGS
    assert set(mapping) == set(nodes.package.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in mapping.items():
        assert name.startswith("EasyAnimate") and cls.CATEGORY == "EasyAnimate", name
        assert callable(getattr(cls, cls.FUNCTION)), name
        for input_name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_every_node_is_registered_with_a_prefixed_name_and_category(nodes):
    mappings_are_complete(nodes)
    assert {"EasyAnimateModelLoader", "EasyAnimateVAEDecode", "EasyAnimateTextEncode"} <= set(
        nodes.package.NODE_CLASS_MAPPINGS
    )


def test_loaders_list_only_folders_that_hold_the_part(nodes, tiny_folders):
    name = install(nodes, tiny_folders, "V5.1")
    (nodes.models / "empty").mkdir()
    (nodes.models / "stray.safetensors").write_bytes(b"")
    (nodes.models / "vae-only" / "vae").mkdir(parents=True)
    n = nodes.nodes
    assert n.EasyAnimateModelLoader.INPUT_TYPES()["required"]["model_folder"][0] == [name]
    assert n.EasyAnimateVAELoader.INPUT_TYPES()["required"]["model_folder"][0] == [name, "vae-only"]
    assert n.EasyAnimateTextEncoderLoader.INPUT_TYPES()["required"]["model_folder"][0] == [name]


@pytest.mark.parametrize(
    ("version", "model_type", "settings"),
    [
        ("V5.1", "FLOW", {"shift": math.e, "multiplier": 1000}),
        ("V5", "V_PREDICTION", {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "zsnr": True}),
    ],
)
def test_sampling_settings_per_version(nodes, version, model_type, settings):
    kind, got = nodes.native.sampling_settings(version)
    assert kind.name == model_type
    assert got == pytest.approx(settings)


@pytest.mark.parametrize("version", ["V5.1", "V5"])
def test_model_loader_returns_a_patcher_over_our_transformer(nodes, tiny_folders, version):
    name = install(nodes, tiny_folders, version)
    patcher, info = nodes.nodes.EasyAnimateModelLoader().load(name, "default")
    model = patcher.model
    assert isinstance(model, nodes.native.EasyAnimateModel)
    assert isinstance(model.diffusion_model.transformer, EasyAnimateTransformer3D)
    assert f"EasyAnimate {version} transformer" in info and "InP" in info
    assert model.model_config.unet_config == {"disable_unet_model_creation": True, "dtype": torch.float32}
    assert model.latent_format.latent_channels == 16 and model.latent_format.scale_factor == 0.7125
    assert (patcher.load_device, patcher.offload_device) == (CPU, CPU)


def test_bf16_weights_load_with_casting_layers(nodes, tiny_folders):
    name = install(nodes, tiny_folders, "V5.1")
    patcher, _ = nodes.nodes.EasyAnimateModelLoader().load(name, "bf16")
    assert patcher.model.diffusion_model.dtype == torch.bfloat16
    assert patcher.model.manual_cast_dtype == torch.float32
    assert isinstance(patcher.model.diffusion_model.transformer.proj_out, easyanimate_core.ops.CastLinear)


def test_wrapper_feeds_zero_inpaint_latents_and_maps_extra_conds(nodes, tiny_folders):
    name = install(nodes, tiny_folders, "V5")
    model = nodes.nodes.EasyAnimateModelLoader().load(name, "default")[0].model
    net, transformer = model.diffusion_model, model.diffusion_model.transformer
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 2, 4, 4, generator=g), torch.tensor([900.0, 900.0])
    text, text_2 = torch.randn(2, 5, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        expected = transformer(x, t, text, text_2, inpaint_latents=torch.zeros(2, 17, 2, 4, 4))[:, :16]
        got = net(x, t, context=text, encoder_hidden_states_t5=text_2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    conds = model.extra_conds(cross_attn=text, easyanimate_text_2=text_2)
    assert set(conds) == {"c_crossattn", "encoder_hidden_states_t5"}
    assert conds["encoder_hidden_states_t5"].cond is text_2


def test_text_encoder_loader_names_what_a_folder_without_transformer_lacks(nodes, tiny_folders):
    folder = nodes.models / "text-only"
    folder.mkdir()
    link_tree(tiny_folders["V5"] / "text_encoder", folder / "text_encoder")
    # BERT without a transformer to tell V4 from V5 is taken as V5 (the MODEL takes V5 / V5.1 only).
    with pytest.raises(ValueError, match="text_encoder_2/config.json.*tokenizer/tokenizer_config.json.*missing"):
        nodes.nodes.EasyAnimateTextEncoderLoader().load("text-only")


@pytest.mark.parametrize(("version", "extras"), [("V5.1", set()), ("V5", {"easyanimate_text_2"})])
def test_text_encode_gives_conditioning_and_loads_the_encoders_first(nodes, tiny_folders, version, extras):
    name = install(nodes, tiny_folders, version)
    handle = nodes.nodes.EasyAnimateTextEncoderLoader().load(name)[0]
    (conditioning,) = nodes.nodes.EasyAnimateTextEncode().encode(handle, "a red fox")
    assert nodes.mm.loads == [[handle.patcher]]
    [[embeds, extra]] = conditioning
    assert embeds.shape[0] == 1 and embeds.shape[-1] == 32 and embeds.device == CPU
    assert set(extra) == extras
    expected = handle.encoders.encode_texts(["a red fox"])
    torch.testing.assert_close(embeds, expected.embeds)


def test_empty_latent_video_shape(nodes):
    (latent,) = nodes.nodes.EasyAnimateEmptyLatentVideo().generate("V5.1", 672, 384, 49, 2)
    assert latent["samples"].shape == (2, 16, 13, 48, 84)
    assert not latent["samples"].any()


@pytest.mark.parametrize(
    ("width", "height", "frames", "message"),
    [
        (672, 384, 50, "frames 50 must be 4k+1 for V5; nearest valid: 49 or 53"),
        (670, 384, 49, "width 670 is not a multiple of 16; nearest valid: 656 or 672"),
        (672, 8, 49, "height 8 is not a multiple of 16; nearest valid: 16"),
    ],
)
def test_empty_latent_video_rejects_sizes_naming_the_nearest_valid(nodes, width, height, frames, message):
    validate = nodes.nodes.EasyAnimateEmptyLatentVideo.VALIDATE_INPUTS
    assert validate("V5", width, height, frames) == message
    assert validate("V5", 672, 384, 49) is True


def test_flow_sigmas_are_the_core_v51_schedule(nodes):
    (sigmas,) = nodes.nodes.EasyAnimateFlowSigmas().get_sigmas(8, 1.0)
    torch.testing.assert_close(sigmas, flow_sigmas(8), rtol=0, atol=0)
    (partial,) = nodes.nodes.EasyAnimateFlowSigmas().get_sigmas(8, 0.5)
    torch.testing.assert_close(partial, flow_sigmas(8)[4:], rtol=0, atol=0)
    assert nodes.nodes.EasyAnimateFlowSigmas().get_sigmas(8, 0.0)[0].numel() == 0
    with pytest.raises(ValueError, match="keeps no step of 8"):
        nodes.nodes.EasyAnimateFlowSigmas().get_sigmas(8, 0.1)


def test_lora_loader_adds_one_lora_patch_per_layer_on_a_clone(nodes, tiny_folders, tmp_path):
    from safetensors.torch import save_file

    model = nodes.nodes.EasyAnimateModelLoader().load(install(nodes, tiny_folders, "V5.1"), "default")[0]
    transformer = model.model.diffusion_model.transformer
    path = "transformer_blocks.0.attn1.to_q"
    weight = transformer.get_submodule(path).weight
    name = "lora_unet__" + path.replace(".", "_")
    down, up = torch.randn(2, weight.shape[1]), torch.randn(weight.shape[0], 2)
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)},
        loras / "style.safetensors",
    )
    sys.modules["folder_paths"].add_model_folder_path("loras", str(loras))
    node = nodes.nodes.EasyAnimateLoraLoader()
    assert "style.safetensors" in node.INPUT_TYPES()["required"]["lora_name"][0]
    patched = node.apply(model, "style.safetensors", 0.7)[0]
    assert patched is not model and not model.patches
    ((strength, adapter, *_),) = patched.patches[f"diffusion_model.transformer.{path}.weight"]
    assert strength == 0.7 and len(patched.patches) == 1
    assert torch.equal(adapter.weights[0], up) and torch.equal(adapter.weights[1], down) and adapter.weights[2] == 1.0
    assert node.apply(model, "style.safetensors", 0.0)[0] is model
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        node.apply(model, "missing.safetensors", 1.0)


def test_lora_loader_refuses_other_models(nodes):
    other = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="not an EasyAnimate model; use ComfyUI's LoraLoaderModelOnly"):
        nodes.nodes.EasyAnimateLoraLoader().apply(other, "x.safetensors", 1.0)


def test_video_rules_route_serves_the_vae_frame_and_size_rules(nodes):
    routes = sys.modules["server"].PromptServer.instance.routes.handlers
    assert ("GET", "/easyanimate/video_rules") in routes
    rules = sys.modules["easyanimate_nodes_under_test.web_routes"].video_rules()
    assert rules["V5.1"] == {
        "frame_step": 4,
        "frame_offset": 1,
        "pixel_multiple": 16,
        "spatial_compression": 8,
        "temporal_compression": 4,
        "fps": 8,
        "conditioning_nodes": True,
    }
    assert rules["V5"]["frame_step"] == 4 and rules["V4"]["frame_step"] == 8 and rules["V4"]["frame_offset"] == 0
    assert rules["V4"]["fps"] == 24
    assert (rules["V3"]["frame_step"], rules["V2"]["frame_step"], rules["V1"]["frame_step"]) == (8, 9, 1)
    assert (rules["V3"]["fps"], rules["V2"]["fps"], rules["V1"]["fps"]) == (24, 24, 12)
    # V1 / V2 released text-to-video models only: the conditioning nodes' snapping ignores their rules.
    assert [v for v in rules if not rules[v]["conditioning_nodes"]] == ["V2", "V1"]


def test_the_model_refuses_an_empty_patch_set_a_stock_lora_loader_passes_when_no_key_maps(nodes, tiny_folders):
    patcher = nodes.nodes.EasyAnimateModelLoader().load(install(nodes, tiny_folders, "V5.1"), "default")[0]
    clone = patcher.clone()
    assert type(clone) is type(patcher)  # ComfyUI's clone keeps the class
    with pytest.raises(ValueError, match="matched no layer of the EasyAnimate MODEL.*EasyAnimate LoRA Loader"):
        clone.add_patches({}, 1.0)
    key = "diffusion_model.transformer.proj_out.weight"
    assert clone.add_patches({key: (torch.zeros(1),)}, 1.0) == [key]  # any real patch is taken as before


def test_loading_the_pack_puts_the_workflows_example_inputs_in_comfys_input_folder(nodes):
    common = nodes.package.common
    shipped = sorted(p.name for p in common.EXAMPLE_INPUTS.glob("easyanimate_*"))
    inputs = nodes.models.parent.parent / "input"
    assert len(shipped) == 6 and sorted(p.name for p in inputs.iterdir()) == shipped
    assert all((inputs / n).read_bytes() == (common.EXAMPLE_INPUTS / n).read_bytes() for n in shipped)
    (inputs / shipped[0]).write_bytes(b"the user's own file")
    (inputs / shipped[1]).unlink()
    assert common.install_example_inputs() == [shipped[1]]  # only what is missing
    assert (inputs / shipped[0]).read_bytes() == b"the user's own file"
