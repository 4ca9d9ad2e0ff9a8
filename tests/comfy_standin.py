"""A small stand-in for the comfy functions the EasyAnimate nodes use, and the fixtures built on it.

The stand-in keeps the real signatures (ComfyUI 0.3.64) and CPU behaviour: ``unet_dtype`` gives float32 on
CPU, ``unet_manual_cast`` casts only non-float32 weights, ``pick_operations`` returns plain layers without a
compute cast and casting layers with one (here core's ``manual_cast``, ComfyUI's is checked in
tests/integration/test_comfy_ops.py). The nodes package is imported as ComfyUI imports it: by file path.
Tests that need more of comfy add it to the modules returned by ``standin_comfy`` (or monkeypatch them),
keeping the real signature.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import easyanimate_core.ops
from tests.tiny_checkpoint import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def standin_comfy(models_dir: Path) -> dict[str, types.ModuleType]:
    """sys.modules entries for the comfy modules and functions the nodes call."""
    loads = []

    def unet_dtype(device=None, model_params=0, supported_dtypes=(), weight_dtype=None):
        return torch.float32  # CPU: ComfyUI runs diffusion models in float32

    def unet_manual_cast(weight_dtype, inference_device, supported_dtypes=()):
        return None if weight_dtype in (torch.float32, torch.float64) else torch.float32

    def load_models_gpu(
        models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False
    ):
        loads.append(list(models))

    def cpu():
        return CPU

    mm = _module(
        "comfy.model_management",
        get_torch_device=cpu,
        unet_offload_device=cpu,
        vae_device=cpu,
        vae_offload_device=cpu,
        text_encoder_device=cpu,
        text_encoder_offload_device=cpu,
        intermediate_device=cpu,
        text_encoder_dtype=lambda device=None: torch.float32,
        unet_dtype=unet_dtype,
        unet_manual_cast=unet_manual_cast,
        load_models_gpu=load_models_gpu,
        loads=loads,
    )

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.patches: dict[str, list] = {}

        def clone(self):
            n = ModelPatcher(self.model, self.load_device, self.offload_device)
            n.patches = {k: list(v) for k, v in self.patches.items()}
            return n

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            model_sd = self.model.state_dict()
            added = [k for k in patches if k in model_sd]
            for k in added:
                self.patches.setdefault(k, []).append((strength_patch, patches[k], strength_model, None, None))
            return added

    class LoRAAdapter:
        name = "lora"

        def __init__(self, loaded_keys, weights):
            self.loaded_keys, self.weights = loaded_keys, weights

    def pick_operations(
        weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False, fp8_optimizations=False, scaled_fp8=None
    ):
        return torch.nn if compute_dtype is None else easyanimate_core.ops.manual_cast

    class ModelType(enum.Enum):
        EPS = 1
        V_PREDICTION = 2
        FLOW = 6

    class CONDRegular:
        def __init__(self, cond):
            self.cond = cond

    class CONDCrossAttn(CONDRegular):
        pass

    class LatentFormat:
        scale_factor = 1.0
        latent_channels = 4
        latent_dimensions = 2

    class BaseModel(torch.nn.Module):
        def __init__(self, model_config, model_type=ModelType.EPS, device=None, unet_model=None):
            super().__init__()
            assert model_config.unet_config.get("disable_unet_model_creation")  # no network built here
            self.latent_format, self.model_config = model_config.latent_format, model_config
            self.manual_cast_dtype, self.device, self.model_type = model_config.manual_cast_dtype, device, model_type

        def extra_conds(self, **kwargs):
            cross_attn = kwargs.get("cross_attn")
            return {} if cross_attn is None else {"c_crossattn": CONDCrossAttn(cross_attn)}

    class BASE:
        unet_config: dict = {}
        unet_extra_config = {"num_heads": -1, "num_head_channels": 64}
        sampling_settings: dict = {}
        latent_format = LatentFormat
        manual_cast_dtype = None

        def __init__(self, unet_config):
            self.unet_config = unet_config.copy()
            self.sampling_settings = self.sampling_settings.copy()
            self.latent_format = self.latent_format()
            for x in self.unet_extra_config:
                self.unet_config[x] = self.unet_extra_config[x]

        def set_inference_dtype(self, dtype, manual_cast_dtype):
            self.unet_config["dtype"] = dtype
            self.manual_cast_dtype = manual_cast_dtype

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0

        def update_absolute(self, value, total=None, preview=None):
            self.current, self.total = value, total or self.total

    folders: dict[str, list[str]] = {}

    def get_filename_list(folder_name: str) -> list[str]:
        return sorted(f for root in folders.get(folder_name, []) if os.path.isdir(root) for f in os.listdir(root))

    def get_full_path_or_raise(folder_name: str, filename: str) -> str:
        for root in folders.get(folder_name, []):
            if os.path.isfile(os.path.join(root, filename)):
                return os.path.join(root, filename)
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        folders.setdefault(folder_name, []).insert(
            0 if is_default else len(folders.get(folder_name, [])), full_folder_path
        )

    modules = {
        "comfy.model_management": mm,
        "comfy.weight_adapter": _module("comfy.weight_adapter", LoRAAdapter=LoRAAdapter),
        "comfy.model_patcher": _module("comfy.model_patcher", ModelPatcher=ModelPatcher),
        "comfy.ops": _module("comfy.ops", pick_operations=pick_operations),
        "comfy.model_base": _module("comfy.model_base", ModelType=ModelType, BaseModel=BaseModel),
        "comfy.conds": _module("comfy.conds", CONDRegular=CONDRegular, CONDCrossAttn=CONDCrossAttn),
        "comfy.latent_formats": _module("comfy.latent_formats", LatentFormat=LatentFormat),
        "comfy.supported_models_base": _module("comfy.supported_models_base", BASE=BASE),
        "comfy.utils": _module("comfy.utils", ProgressBar=ProgressBar),
    }
    comfy = _module("comfy", __path__=[], **{name.split(".")[1]: m for name, m in modules.items()})
    folder_paths = _module(
        "folder_paths",
        models_dir=str(models_dir),
        add_model_folder_path=add_model_folder_path,
        get_folder_paths=lambda folder_name: list(folders.get(folder_name, [])),
        get_filename_list=get_filename_list,
        get_full_path_or_raise=get_full_path_or_raise,
    )

    class RouteTable:  # aiohttp.web.RouteTableDef's decorator API, recording the handlers
        def __init__(self):
            self.handlers: dict[tuple[str, str], object] = {}

        def get(self, path, **kwargs):
            def register(handler):
                self.handlers["GET", path] = handler
                return handler

            return register

    server = _module("server", PromptServer=types.SimpleNamespace(instance=types.SimpleNamespace(routes=RouteTable())))
    return {"comfy": comfy, "folder_paths": folder_paths, "server": server, **modules}


@pytest.fixture
def nodes(tmp_path, monkeypatch):
    """The pack's nodes package imported against the stand-in, with an empty models/EasyAnimate/."""
    for name, module in standin_comfy(tmp_path / "models").items():
        monkeypatch.setitem(sys.modules, name, module)
    (tmp_path / "models" / "EasyAnimate").mkdir(parents=True)
    package = "easyanimate_nodes_under_test"
    spec = importlib.util.spec_from_file_location(
        package, REPO / "nodes" / "__init__.py", submodule_search_locations=[str(REPO / "nodes")]
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, package, module)
    spec.loader.exec_module(module)
    yield types.SimpleNamespace(
        package=module,
        nodes=types.SimpleNamespace(**module.NODE_CLASS_MAPPINGS),  # node classes by their registered names
        native=sys.modules[f"{package}.native_model"],
        models=tmp_path / "models" / "EasyAnimate",
        mm=sys.modules["comfy.model_management"],
    )
    for name in [n for n in sys.modules if n.startswith(package + ".")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Tiny random InP checkpoints for V5.1 and V5 (written once, symlinked into each test's models folder)."""
    root = tmp_path_factory.mktemp("tiny")
    return {v: write_tiny_checkpoint(root / v.replace(".", ""), "InP", version=v) for v in ("V5.1", "V5")}


def install(nodes, tiny_folders, version: str) -> str:
    name = f"tiny-{version}"
    (nodes.models / name).symlink_to(tiny_folders[version], target_is_directory=True)
    return name
