"""A small stand-in for the comfy functions the EasyAnimate nodes use, and the fixtures built on it.

The stand-in keeps the real signatures (ComfyUI 0.3.64) and CPU behaviour: ``unet_dtype`` gives float32 on
CPU, ``unet_manual_cast`` casts only non-float32 weights, ``pick_operations`` returns plain layers without a
compute cast and casting layers with one (here core's ``manual_cast``, ComfyUI's is checked in
tests/integration/test_comfy_ops.py). The nodes package is imported as ComfyUI imports it: by file path.
Tests that need more of comfy add it to the modules returned by ``standin_comfy`` (or monkeypatch them),
keeping the real signature.
"""

from __future__ import annotations

import copy
import enum
import importlib.util
import logging
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import easyanimate_core.micro
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

    sampling = sampling_standins()

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
            self.model_options = {"transformer_options": {}}

        def clone(self):
            n = self.__class__(self.model, self.load_device, self.offload_device)
            n.patches = {k: list(v) for k, v in self.patches.items()}
            n.model_options = copy.deepcopy(self.model_options)  # comfy: create_model_options_clone (nested dicts)
            n.object_patches = dict(self.object_patches)
            return n

        object_patches: dict = {}

        def add_object_patch(self, name, obj):
            self.object_patches = {**self.object_patches, name: obj}

        def get_model_object(self, name):
            return self.object_patches[name] if name in self.object_patches else getattr(self.model, name)

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
            self.model_sampling = sampling.model_sampling(model_config, model_type)

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

    def get_full_path(folder_name: str, filename: str) -> str | None:
        try:
            return get_full_path_or_raise(folder_name, filename)
        except FileNotFoundError:
            return None

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        folders.setdefault(folder_name, []).insert(
            0 if is_default else len(folders.get(folder_name, [])), full_folder_path
        )

    modules = {
        "comfy.model_management": mm,
        "comfy.weight_adapter": _module("comfy.weight_adapter", LoRAAdapter=LoRAAdapter),
        "comfy.model_patcher": _module("comfy.model_patcher", ModelPatcher=ModelPatcher),
        "comfy.ops": _module("comfy.ops", pick_operations=pick_operations, disable_weight_init=torch.nn),
        **vae_standins(mm),
        "comfy.model_base": _module("comfy.model_base", ModelType=ModelType, BaseModel=BaseModel),
        "comfy.conds": _module("comfy.conds", CONDRegular=CONDRegular, CONDCrossAttn=CONDCrossAttn),
        "comfy.latent_formats": _module("comfy.latent_formats", LatentFormat=LatentFormat),
        "comfy.supported_models_base": _module("comfy.supported_models_base", BASE=BASE),
        "comfy.utils": _module("comfy.utils", ProgressBar=ProgressBar, PROGRESS_BAR_ENABLED=True),
        "comfy.patcher_extension": patcher_extension_standin(),
        **sampling.modules,
    }
    folder_paths = _module(
        "folder_paths",
        models_dir=str(models_dir),
        add_model_folder_path=add_model_folder_path,
        get_folder_paths=lambda folder_name: list(folders.get(folder_name, [])),
        get_filename_list=get_filename_list,
        get_full_path_or_raise=get_full_path_or_raise,
        get_full_path=get_full_path,
        get_user_directory=lambda: str(models_dir.parent / "user"),
        get_input_directory=lambda: str(models_dir.parent / "input"),
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
    top_level = {name: m for name, m in modules.items() if not name.startswith("comfy.")}
    comfy_modules = {name: m for name, m in modules.items() if name.startswith("comfy.")}
    comfy = _module("comfy", __path__=[], **{name.split(".")[1]: m for name, m in comfy_modules.items()})
    return {"comfy": comfy, "folder_paths": folder_paths, "server": server, **top_level, **comfy_modules}


def patcher_extension_standin() -> types.ModuleType:
    """comfy.patcher_extension's wrapper registry (WrappersMP, add_wrapper_with_key) as ComfyUI 0.3.64 / 0.8 have it."""

    class WrappersMP:
        OUTER_SAMPLE = "outer_sample"
        SAMPLER_SAMPLE = "sampler_sample"
        CALC_COND_BATCH = "calc_cond_batch"
        APPLY_MODEL = "apply_model"
        DIFFUSION_MODEL = "diffusion_model"

    def add_wrapper_with_key(wrapper_type, key, wrapper, transformer_options, is_model_options=False):
        if is_model_options:
            transformer_options = transformer_options.setdefault("transformer_options", {})
        wrappers = transformer_options.setdefault("wrappers", {})
        wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    return _module("comfy.patcher_extension", WrappersMP=WrappersMP, add_wrapper_with_key=add_wrapper_with_key)


def vae_standins(mm: types.ModuleType) -> dict[str, types.ModuleType]:
    """What the VAE nodes use: memory / interrupt functions added to ``mm`` and ``comfy.sd.VAE``.

    ``mm.free_memory`` is what ``get_free_memory`` reports (tests lower it to force tiling); setting
    ``mm.interrupt_at`` to n makes the n-th ``throw_exception_if_processing_interrupted`` call raise.
    ``comfy.sd.VAE`` keeps the real class's methods that our subclass does not override (0.3.64 code).
    """

    class InterruptProcessingException(Exception):
        pass

    def throw_exception_if_processing_interrupted():
        mm.interrupt_checks += 1
        if mm.interrupt_at is not None and mm.interrupt_checks >= mm.interrupt_at:
            raise InterruptProcessingException()

    def vae_dtype(device=None, allowed_dtypes=[]):  # noqa: B006 (ComfyUI's signature)
        return torch.float32  # CPU: neither fp16 nor bf16 is picked

    mm.__dict__.update(
        free_memory=64 << 30,
        get_free_memory=lambda dev=None, torch_free_too=False: mm.free_memory,
        soft_empty_cache=lambda force=False: None,
        InterruptProcessingException=InterruptProcessingException,
        throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
        interrupt_at=None,
        interrupt_checks=0,
        OOM_EXCEPTION=torch.cuda.OutOfMemoryError,
        vae_dtype=vae_dtype,
    )

    class VAE:
        def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None):
            # 0.3.64's defaults, then its early return on a state dict it detects no VAE in.
            self.memory_used_encode = lambda shape, dtype: 1767 * shape[2] * shape[3] * dtype.itemsize
            self.memory_used_decode = lambda shape, dtype: 2178 * shape[2] * shape[3] * 64 * dtype.itemsize
            self.downscale_ratio = self.upscale_ratio = 8
            self.latent_channels, self.latent_dim, self.output_channels = 4, 2, 3
            self.process_input = lambda image: image * 2.0 - 1.0
            self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
            self.working_dtypes = [torch.bfloat16, torch.float32]
            self.disable_offload = self.not_video = False
            self.downscale_index_formula = self.upscale_index_formula = self.extra_1d_channel = None
            self.crop_input = True
            if config is None and not sd:
                logging.warning("WARNING: No VAE weights detected, VAE not initalized.")
                self.first_stage_model = None
                return
            raise NotImplementedError("the stand-in builds no VAE family of ComfyUI's own")

        def throw_exception_if_invalid(self):
            if self.first_stage_model is None:
                raise RuntimeError("ERROR: VAE is invalid: None")

        def get_sd(self):
            return self.first_stage_model.state_dict()

        def spacial_compression_decode(self):
            try:
                return self.upscale_ratio[-1]
            except TypeError:
                return self.upscale_ratio

        def spacial_compression_encode(self):
            try:
                return self.downscale_ratio[-1]
            except TypeError:
                return self.downscale_ratio

        def temporal_compression_decode(self):
            try:
                return round(self.upscale_ratio[0](8192) / 8192)
            except TypeError:
                return None

    return {"comfy.sd": _module("comfy.sd", VAE=VAE)}


def sampling_standins() -> types.SimpleNamespace:
    """Stand-ins for ComfyUI's sampling entry points (0.3.64 signatures): model_sampling objects as
    comfy.model_sampling builds them, comfy.sample / comfy.samplers / latent_preview / node_helpers /
    ModelSamplingSD3. ``comfy.sample.sample`` records its call in ``calls`` and returns the latent unchanged:
    tests check what the nodes ask ComfyUI to do; tests/integration runs the real sampling."""
    calls: list[dict] = []

    def time_snr_shift(alpha, t):
        return t if alpha == 1.0 else alpha * t / (1 + (alpha - 1) * t)

    class ModelSamplingDiscreteFlow:  # with CONST
        def __init__(self, model_config=None):
            settings = model_config.sampling_settings if model_config is not None else {}
            self.set_parameters(shift=settings.get("shift", 1.0), multiplier=settings.get("multiplier", 1000))

        def set_parameters(self, shift=1.0, timesteps=1000, multiplier=1000):
            self.shift, self.multiplier = shift, multiplier
            self.sigmas = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier)

        def sigma(self, timestep):
            return time_snr_shift(self.shift, timestep / self.multiplier)

    class ModelSamplingDiscrete:  # with V_PREDICTION or EPS
        def __init__(self, model_config=None):
            s = model_config.sampling_settings
            schedule = s.get("beta_schedule", "linear")
            assert schedule in ("linear", "sqrt_linear")  # comfy.ldm.modules.diffusionmodules.util.make_beta_schedule
            if schedule == "sqrt_linear":  # comfy's name for plain linear betas
                betas = torch.linspace(s["linear_start"], s["linear_end"], 1000, dtype=torch.float64)
            else:  # comfy's "linear": linear in sqrt space
                betas = torch.linspace(s["linear_start"] ** 0.5, s["linear_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
            abar = torch.cumprod(1.0 - betas, dim=0)
            sigmas = ((1 - abar) / abar) ** 0.5
            if s.get("zsnr", False):  # comfy.model_sampling.rescale_zero_terminal_snr_sigmas
                abar_sqrt = (1 / (sigmas * sigmas + 1)).sqrt()
                first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
                abar = ((abar_sqrt - last) * (first / (first - last))) ** 2
                abar[-1] = 4.8973451890853435e-08
                sigmas = ((1 - abar) / abar) ** 0.5
            self.sigmas, self.log_sigmas = sigmas.float(), sigmas.log().float()

        @property
        def sigma_max(self):
            return self.sigmas[-1]

        def sigma(self, timestep):
            t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
            low, high, w = t.floor().long(), t.ceil().long(), t.frac()
            return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def model_sampling(model_config, model_type):
        flow = model_type.name == "FLOW"
        return (ModelSamplingDiscreteFlow if flow else ModelSamplingDiscrete)(model_config)

    class ModelSamplingSD3:
        def patch(self, model, shift, multiplier=1000):
            m = model.clone()
            ms = ModelSamplingDiscreteFlow(model.model.model_config)
            ms.set_parameters(shift=shift, multiplier=multiplier)
            m.add_object_patch("model_sampling", ms)
            return (m,)

    def prepare_noise(latent_image, seed, noise_inds=None):
        assert noise_inds is None  # batch_index lists are not used by the pack's tests
        generator = torch.manual_seed(seed)
        return torch.randn(latent_image.size(), dtype=latent_image.dtype, generator=generator, device="cpu")

    def fix_empty_latent_channels(model, latent_image):
        latent_format = model.get_model_object("latent_format")
        if latent_format.latent_channels != latent_image.shape[1] and torch.count_nonzero(latent_image) == 0:
            latent_image = latent_image.repeat(1, latent_format.latent_channels // latent_image.shape[1], 1, 1, 1)
        return latent_image

    def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0,
               disable_noise=False, start_step=None, last_step=None, force_full_denoise=False, noise_mask=None,
               sigmas=None, callback=None, disable_pbar=False, seed=None):  # fmt: skip
        calls.append({k: v for k, v in locals().items()})
        return latent_image.clone()

    class KSampler:
        SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal"]
        SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "ddim", "uni_pc"]

    def prepare_callback(model, steps, x0_output_dict=None):
        def callback(step, x0, x, total_steps):
            pass

        return callback

    def conditioning_set_values(conditioning, values={}, append=False):  # noqa: B006 (ComfyUI's signature)
        out = []
        for t in conditioning:
            n = [t[0], t[1].copy()]
            for k, val in values.items():
                n[1][k] = val + n[1][k] if append and n[1].get(k) is not None else val
            out.append(n)
        return out

    modules = {
        "comfy.sample": _module(
            "comfy.sample",
            prepare_noise=prepare_noise,
            fix_empty_latent_channels=fix_empty_latent_channels,
            sample=sample,
            calls=calls,
        ),
        "comfy.samplers": _module("comfy.samplers", KSampler=KSampler),
        "latent_preview": _module("latent_preview", prepare_callback=prepare_callback),
        "node_helpers": _module("node_helpers", conditioning_set_values=conditioning_set_values),
        "comfy_extras": _module("comfy_extras", __path__=[]),
        "comfy_extras.nodes_model_advanced": _module(
            "comfy_extras.nodes_model_advanced", ModelSamplingSD3=ModelSamplingSD3
        ),
    }
    return types.SimpleNamespace(modules=modules, calls=calls, model_sampling=model_sampling)


@pytest.fixture
def nodes(tmp_path, monkeypatch):
    """The pack's nodes package imported against the stand-in, with an empty models/EasyAnimate/ and no bundled
    micro model."""
    for name, module in standin_comfy(tmp_path / "models").items():
        monkeypatch.setitem(sys.modules, name, module)
    # The bundled micro model's place, empty unless a test writes one (the pack's own may hold weights).
    monkeypatch.setattr(easyanimate_core.micro, "MICRO_MODEL", tmp_path / "bundled_micro")
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


class TinyFolders(dict):
    """Tiny random checkpoints by version, each written on first use: InP for V5.1, V5, V4 and V3 (V2 and V1
    released text-to-video models only)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, version: str) -> Path:
        variant = "T2V" if version in ("V2", "V1") else "InP"
        self[version] = write_tiny_checkpoint(self.root / version.replace(".", ""), variant, version=version)
        return self[version]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Tiny random checkpoints (written once, hard-linked into each test's models folder)."""
    return TinyFolders(tmp_path_factory.mktemp("tiny"))


def link_tree(source: Path, target: Path) -> Path:
    """``source`` copied to ``target`` as hard links: no data copied, and no symlink, which the loaders refuse when
    it leads out of ComfyUI's model folders."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def install(nodes, tiny_folders, version: str) -> str:
    name = f"tiny-{version}"
    link_tree(tiny_folders[version], nodes.models / name)
    return name
