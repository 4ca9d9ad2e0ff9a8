"""Model and text-encoder loaders reading ComfyUI's standard diffusion_models/ and text_encoders/ folders (stand-in)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.comfy_standin import install, link_tree


def standard_folder(nodes, name: str):
    """models/<name>/ registered with folder_paths, as ComfyUI registers its standard folders."""
    folder = nodes.models.parent / name
    folder.mkdir(exist_ok=True)
    sys.modules["folder_paths"].add_model_folder_path(name, str(folder))
    return folder


def test_a_single_transformer_file_in_diffusion_models_is_listed_validated_and_loaded(nodes, tiny_folders):
    folder = standard_folder(nodes, "diffusion_models")
    shutil.copy(
        tiny_folders["V5.1"] / "transformer" / "diffusion_pytorch_model.safetensors", folder / "tiny.safetensors"
    )
    (folder / "old.ckpt").write_bytes(b"pickle")  # pickle files are never offered
    loader = nodes.nodes.EasyAnimateModelLoader
    assert loader.INPUT_TYPES()["required"]["model_folder"][0] == ["tiny.safetensors"]
    assert loader.VALIDATE_INPUTS("tiny.safetensors") is True
    patcher, info = loader().load("tiny.safetensors", "default")
    assert isinstance(patcher.model, nodes.native.EasyAnimateModel)
    assert "EasyAnimate V5.1 transformer" in info and "variant: InP" in info


def test_files_of_other_kinds_are_refused_at_validation_naming_the_fix(nodes, tiny_folders):
    folder = standard_folder(nodes, "diffusion_models")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, folder / "other.safetensors")
    lora = {
        "lora_unet_proj_out.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_proj_out.lora_up.weight": torch.zeros(4, 2),
    }
    save_file(lora, folder / "a_lora.safetensors")
    shutil.copy(tiny_folders["V5.1"] / "vae" / "diffusion_pytorch_model.safetensors", folder / "vae.safetensors")
    validate = nodes.nodes.EasyAnimateModelLoader.VALIDATE_INPUTS
    other = validate("other.safetensors")
    assert other.startswith("diffusion_models/other.safetensors is not an EasyAnimate transformer")
    assert other.endswith("load other models with ComfyUI's UNETLoader")
    assert "It looks like a LoRA" in validate("a_lora.safetensors")
    assert "It looks like a VAE" in validate("vae.safetensors")
    assert "neither a folder under models/EasyAnimate/ nor a file" in validate("missing.safetensors")
    # A folder under models/EasyAnimate/ needs no header check at validation.
    assert validate(install(nodes, tiny_folders, "V5")) is True


def test_text_encoders_folder_with_the_model_layout_loads(nodes, tiny_folders):
    folder = standard_folder(nodes, "text_encoders") / "qwen2-vl"
    folder.mkdir()
    for part in ("text_encoder", "tokenizer"):
        link_tree(tiny_folders["V5.1"] / part, folder / part)
    loader = nodes.nodes.EasyAnimateTextEncoderLoader
    assert loader.INPUT_TYPES()["required"]["model_folder"][0] == ["qwen2-vl"]
    assert loader.VALIDATE_INPUTS("qwen2-vl") is True
    handle = loader().load("qwen2-vl")[0]
    assert handle.encoders.version == "v5.1"


def test_a_single_file_qwen2_vl_needs_its_config_and_tokenizer_beside_it(nodes, tiny_folders):
    folder = standard_folder(nodes, "text_encoders")
    source = tiny_folders["V5.1"]
    shutil.copy(source / "text_encoder" / "model.safetensors", folder / "qwen2vl.safetensors")
    loader = nodes.nodes.EasyAnimateTextEncoderLoader
    assert loader.INPUT_TYPES()["required"]["model_folder"][0] == ["qwen2vl.safetensors"]
    error = loader.VALIDATE_INPUTS("qwen2vl.safetensors")
    assert error == (
        "text_encoders/qwen2vl.safetensors is a single-file Qwen2-VL; its config and tokenizer are not there: put "
        "config.json (from the model folder's text_encoder/) and the tokenizer files (everything in its tokenizer/ "
        "folder) into text_encoders/qwen2vl/ (missing: config.json, tokenizer_config.json, tokenizer.json), or load "
        "the model folder instead"
    )
    parts = folder / "qwen2vl"
    shutil.copytree(source / "tokenizer", parts)
    shutil.copy(source / "text_encoder" / "config.json", parts / "config.json")
    assert loader.VALIDATE_INPUTS("qwen2vl.safetensors") is True
    single = loader().load("qwen2vl.safetensors")[0]
    from_folder = loader().load(install(nodes, tiny_folders, "V5.1"))[0]
    got, expected = single.encoders.encode_texts(["a red fox"]), from_folder.encoders.encode_texts(["a red fox"])
    torch.testing.assert_close(got.embeds, expected.embeds, rtol=0, atol=0)


def test_a_single_file_that_is_not_qwen2_vl_is_refused(nodes, tiny_folders):
    folder = standard_folder(nodes, "text_encoders")
    shutil.copy(tiny_folders["V5"] / "text_encoder" / "model.safetensors", folder / "bert.safetensors")
    error = nodes.nodes.EasyAnimateTextEncoderLoader.VALIDATE_INPUTS("bert.safetensors")
    assert error.startswith("text_encoders/bert.safetensors is not a Qwen2-VL text encoder")
    assert "text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/" in error and "CLIPLoader" in error


def test_the_bundled_micro_model_is_every_loaders_first_choice_and_sets_its_latent_scaling(nodes, tmp_path):
    import easyanimate_core.micro as micro
    from easyanimate_core.micro import model as micro_model

    bundled = nodes.package.common.BUNDLED_MICRO
    loaders = nodes.nodes
    lists = {
        "model": lambda: loaders.EasyAnimateModelLoader.INPUT_TYPES()["required"]["model_folder"][0],
        "vae": lambda: loaders.EasyAnimateVAELoader.INPUT_TYPES()["required"]["model_folder"][0],
        "text": lambda: loaders.EasyAnimateTextEncoderLoader.INPUT_TYPES()["required"]["model_folder"][0],
        "lora": lambda: loaders.EasyAnimateLoraLoader.INPUT_TYPES()["required"]["lora_name"][0],
    }
    (nodes.models / "a-user-model" / "transformer").mkdir(parents=True)
    assert bundled not in lists["model"]() + lists["vae"]() + lists["text"]()  # no weights shipped: not offered

    micro_model.write_initial_checkpoint(micro.MICRO_MODEL, "InP")
    config = micro.MICRO_MODEL / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "scaling_factor": 0.5}))
    (micro.MICRO_MODEL / "loras").mkdir()
    (micro.MICRO_MODEL / "loras" / "micro_cyan.safetensors").write_bytes(b"")
    assert lists["model"]() == [bundled, "a-user-model"]
    assert lists["vae"]()[0] == bundled and lists["text"]()[0] == bundled
    assert "micro_cyan.safetensors" in lists["lora"]()

    patcher, info = loaders.EasyAnimateModelLoader().load(bundled, "default")
    assert "EasyAnimate V5.1 transformer" in info and "variant: InP" in info
    # Model space = VAE space x the folder VAE's own factor, not the released 0.7125.
    assert patcher.model.latent_format.scale_factor == 0.5
    (text_encoder,) = loaders.EasyAnimateTextEncoderLoader().load(bundled)
    (conditioning,) = loaders.EasyAnimateTextEncode().encode(text_encoder, "a red circle moving right")
    assert conditioning[0][0].shape[-1] == micro_model.TEXT_WIDTH


# --- every user-supplied name resolves only inside ComfyUI's model folders (common.resolve_in_folders) ----------

# (node, input, the folder a name is looked up in, the part a folder needs) for every loader taking a name.
LOADERS = [
    ("EasyAnimateModelLoader", "model_folder", "EasyAnimate", "transformer"),
    ("EasyAnimateTextEncoderLoader", "model_folder", "text_encoders", "text_encoder"),
    ("EasyAnimateVAELoader", "model_folder", "EasyAnimate", "vae"),
    ("EasyAnimateImageEncoderLoader", "model_folder", "EasyAnimate", "image_encoder"),
    ("EasyAnimateLoraLoader", "lora_name", "loras", None),
]
ESCAPES = {
    "dotdot": "'..'; models load only from ComfyUI's model folders",
    "absolute": "is an absolute path; models load only from ComfyUI's model folders",
    "symlink": "outside ComfyUI's",
}


def _escape_name(nodes, tiny_folders, folder_name: str, part: str | None, how: str) -> str:
    """A name that reaches a loadable model outside ComfyUI's ``folder_name`` folders, by ``how``."""
    outside = nodes.models.parent.parent / "outside"
    if not outside.exists():
        link_tree(tiny_folders["V4"], outside / "tiny")  # V4 InP: every part, the image encoder too
        down, up = torch.zeros(2, 8), torch.zeros(8, 2)
        lora = {"lora_unet_proj_out.lora_down.weight": down, "lora_unet_proj_out.lora_up.weight": up}
        save_file(lora, outside / "lora.safetensors")
    target = outside / ("tiny" if part else "lora.safetensors")
    folder = nodes.models if folder_name == "EasyAnimate" else standard_folder(nodes, folder_name)
    if how == "dotdot":
        return os.path.relpath(target, folder)
    if how == "absolute":
        return str(target)
    (folder / "link").symlink_to(target, target_is_directory=part is not None)
    return "link"


@pytest.mark.parametrize("how", list(ESCAPES))
@pytest.mark.parametrize(("node", "input_name", "folder_name", "part"), LOADERS, ids=[n for n, *_ in LOADERS])
def test_no_loader_reaches_a_model_outside_comfyuis_folders(nodes, tiny_folders, node, input_name, folder_name, part,
                                                            how):  # fmt: skip
    name = _escape_name(nodes, tiny_folders, folder_name, part, how)
    cls = getattr(nodes.nodes, node)
    if hasattr(cls, "VALIDATE_INPUTS"):
        assert ESCAPES[how] in cls.VALIDATE_INPUTS(**{input_name: name})
    arguments = {input_name: name}
    if node == "EasyAnimateModelLoader":
        arguments["weight_dtype"] = "default"
    if node == "EasyAnimateLoraLoader":
        model = nodes.nodes.EasyAnimateModelLoader().load(install(nodes, tiny_folders, "V5.1"), "default")[0]
        arguments.update(model=model, strength=1.0)
    with pytest.raises(ValueError, match=re.escape(ESCAPES[how])):
        getattr(cls(), cls.FUNCTION)(**arguments)


def test_names_inside_the_folders_still_resolve_normalised(nodes, tiny_folders):
    common = nodes.package.common
    assert common.checked_name("./sub//a.safetensors") == "sub/a.safetensors"
    assert common.checked_name("sub\\a.safetensors") == "sub/a.safetensors"  # Windows separators
    for bad in ("", "  ", "a\x00b", "C:\\models\\a.safetensors", "sub/../../a"):
        with pytest.raises(ValueError, match="model name"):
            common.checked_name(bad)
    # A link from one of the folder's roots into another of its roots (extra_model_paths.yaml) is inside.
    second = nodes.models.parent / "second_root"
    link_tree(tiny_folders["V5.1"], second / "tiny")
    sys.modules["folder_paths"].add_model_folder_path("EasyAnimate", str(second))
    (nodes.models / "linked").symlink_to(second / "tiny", target_is_directory=True)
    assert nodes.nodes.EasyAnimateVAELoader.VALIDATE_INPUTS("linked") is True
    assert common.model_folder_path("linked") == nodes.models / "linked"


# --- truncated or corrupt files: named with the fix, on the node that was given them --------------------------


def _truncate(path):
    """Replace ``path`` (a hard link into the shared fixture) with a new file holding its first half."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_text_encoder_is_named_with_the_fix_on_the_text_encoder_loader(nodes, tiny_folders):
    loader = nodes.nodes.EasyAnimateTextEncoderLoader
    name = install(nodes, tiny_folders, "V5.1")
    _truncate(nodes.models / name / "text_encoder" / "model.safetensors")
    with pytest.raises(ValueError, match=r"text_encoder/model.safetensors: truncated: .* Download it again"):
        loader().load(name)
    folder = standard_folder(nodes, "text_encoders")
    shutil.copy(tiny_folders["V5.1"] / "text_encoder" / "model.safetensors", folder / "qwen2vl.safetensors")
    _truncate(folder / "qwen2vl.safetensors")
    assert re.search(
        r"qwen2vl.safetensors: truncated: .* Download it again", loader.VALIDATE_INPUTS("qwen2vl.safetensors")
    )
    (folder / "garbage.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors file at all
    assert "garbage.safetensors: not a readable safetensors file" in loader.VALIDATE_INPUTS("garbage.safetensors")


def test_a_truncated_transformer_is_reported_by_the_model_loader_not_the_text_encoder_loader(nodes, tiny_folders):
    name = install(nodes, tiny_folders, "V5.1")
    _truncate(nodes.models / name / "transformer" / "diffusion_pytorch_model.safetensors")
    (handle,) = nodes.nodes.EasyAnimateTextEncoderLoader().load(name)  # reads the transformer only to pick a version
    assert handle.encoders.version == "v5.1"
    error = nodes.nodes.EasyAnimateModelLoader.VALIDATE_INPUTS(name)
    assert re.search(r"transformer/diffusion_pytorch_model.safetensors: truncated: .* Download it again", error)
    with pytest.raises(ValueError, match="truncated"):
        nodes.nodes.EasyAnimateModelLoader().load(name, "default")


def test_a_truncated_lora_or_image_encoder_is_named_with_the_fix_on_its_loader(nodes, tiny_folders):
    model = nodes.nodes.EasyAnimateModelLoader().load(install(nodes, tiny_folders, "V5.1"), "default")[0]
    loras = standard_folder(nodes, "loras")
    lora = {"lora_unet__proj_out.lora_down.weight": torch.zeros(2, 8), "lora_unet__proj_out.alpha": torch.tensor(2.0)}
    save_file(lora, loras / "style.safetensors")
    _truncate(loras / "style.safetensors")
    with pytest.raises(ValueError, match=r"style.safetensors: not a readable safetensors file .* download it again"):
        nodes.nodes.EasyAnimateLoraLoader().apply(model, "style.safetensors", 1.0)
    name = install(nodes, tiny_folders, "V4")
    _truncate(nodes.models / name / "image_encoder" / "model.safetensors")
    with pytest.raises(ValueError, match=r"image_encoder/model.safetensors: truncated: .* Download it again"):
        nodes.nodes.EasyAnimateImageEncoderLoader().load(name)
