"""EasyAnimate V5 / V5.1 as a native ComfyUI MODEL (a ModelPatcher over a comfy BaseModel).

Choice: the BaseModel is built with ``disable_unet_model_creation`` and its ``diffusion_model`` is set
to our transformer, loaded by ``easyanimate_core.loading.load_transformer`` with the comfy.ops
namespace that ``comfy.ops.pick_operations`` picks (as ``comfy.sd.load_diffusion_model_state_dict``
does). Our loader builds on the meta device and assigns every tensor, so weights are read once and
never materialised twice; ComfyUI's own ``BaseModel`` constructor would build with random weights first.
"""

from __future__ import annotations

import math

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models_base
import torch

from easyanimate_core.loading import inspect_checkpoint, load_transformer
from easyanimate_core.pipeline import model_inputs, model_version
from easyanimate_core.sampling import SCHEDULES, FlowSchedule
from easyanimate_core.transformer import EasyAnimateTransformer3D
from easyanimate_core.vae import VAE_V51

WEIGHT_DTYPES = {
    "default": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

# Conditioning-dict keys (set by our text-encode / conditioning nodes) -> transformer keyword arguments.
COND_TO_KWARG = {
    "easyanimate_text_2": "encoder_hidden_states_t5",
    "easyanimate_inpaint_latents": "inpaint_latents",
    "easyanimate_control_latents": "control_latents",
}


class EasyAnimateLatentFormat(comfy.latent_formats.LatentFormat):
    """The mag VAE's 16-channel video latents; model space = VAE space x scaling_factor (0.7125)."""

    latent_channels = VAE_V51.latent_channels
    latent_dimensions = 3
    scale_factor = VAE_V51.scaling_factor


def sampling_settings(version: str) -> tuple[comfy.model_base.ModelType, dict]:
    """ComfyUI model type and sampling settings equal to the version's released schedule."""
    schedule = SCHEDULES[version]
    if isinstance(schedule, FlowSchedule):
        # ModelSamplingDiscreteFlow: sigma(t) = time_snr_shift(shift, t / 1000) = s t / (1 + (s - 1) t), which is
        # our e^mu / (e^mu + 1/t - 1) for s = e^mu; the model is fed sigma * multiplier = sigma * 1000 as ours.
        return comfy.model_base.ModelType.FLOW, {"shift": math.exp(schedule.mu), "multiplier": 1000}
    # V5: v-prediction on the scaled_linear betas, rescaled to zero terminal SNR.
    return comfy.model_base.ModelType.V_PREDICTION, {
        "beta_schedule": "linear",  # comfy's "linear" is the sqrt-space (scaled_linear) schedule
        "linear_start": schedule.beta_start,
        "linear_end": schedule.beta_end,
        "zsnr": schedule.zero_terminal_snr,
    }


class EasyAnimateModelConfig(comfy.supported_models_base.BASE):
    """The model config a BaseModel reads (not registered for auto-detection)."""

    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}  # otherwise SD-UNet head settings are merged into unet_config
    latent_format = EasyAnimateLatentFormat
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 2.0

    def __init__(self, version: str):
        super().__init__(self.unet_config)
        self.version = version
        self.model_type, settings = sampling_settings(version)
        self.sampling_settings = settings


class EasyAnimateNet(torch.nn.Module):
    """ComfyUI's diffusion-model call ``(x, timesteps, context, **conds)`` onto our transformer."""

    def __init__(self, transformer: EasyAnimateTransformer3D):
        super().__init__()
        self.transformer = transformer
        self.inpaint_channels, self.control_channels = model_inputs(
            transformer, EasyAnimateLatentFormat.latent_channels
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj.weight.dtype

    def forward(self, x, timesteps, context=None, control=None, transformer_options=None, **kwargs):
        extra = {name: kwargs[name] for name in COND_TO_KWARG.values() if kwargs.get(name) is not None}
        # Without images / a control video the official pipelines feed zeros (text-to-video on InP / Control models).
        for name, channels in (("inpaint_latents", self.inpaint_channels), ("control_latents", self.control_channels)):
            if channels and name not in extra:
                extra[name] = x.new_zeros(x.shape[0], channels, *x.shape[2:])
        out = self.transformer(x, timesteps, context, **extra)
        return out[:, : x.shape[1]]  # a learned-sigma output carries extra channels


class EasyAnimateModel(comfy.model_base.BaseModel):
    """BaseModel whose diffusion_model is an already-loaded EasyAnimate transformer."""

    def __init__(self, model_config: EasyAnimateModelConfig, transformer: EasyAnimateTransformer3D, device=None):
        super().__init__(model_config, model_config.model_type, device=device)
        self.diffusion_model = EasyAnimateNet(transformer)
        self.info = transformer.info

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        for key, kwarg in COND_TO_KWARG.items():
            value = kwargs.get(key)
            if value is not None:
                out[kwarg] = comfy.conds.CONDRegular(value)
        return out


def load_native_model(path, weight_dtype: str = "default") -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over our transformer at ``path``, with dtypes and operations picked as comfy.sd does."""
    info = inspect_checkpoint(path, "transformer")
    if info.version not in ("V5", "V5.1"):
        raise ValueError(f"{path} holds an EasyAnimate {info.version} transformer; this loader takes V5 and V5.1")
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    config = EasyAnimateModelConfig(info.version)
    unet_dtype = WEIGHT_DTYPES[weight_dtype]
    if unet_dtype is None:
        unet_dtype = comfy.model_management.unet_dtype(
            model_params=info.num_params,
            supported_dtypes=config.supported_inference_dtypes,
            weight_dtype=info.weight_dtype,
        )
    manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(unet_dtype, manual_cast)
    operations = comfy.ops.pick_operations(unet_dtype, manual_cast)
    transformer = load_transformer(path, dtype=unet_dtype, device=offload_device, operations=operations)
    if model_version(transformer) != info.version:
        raise ValueError(f"{path}: detected {info.version} but the loaded transformer is {model_version(transformer)}")
    model = EasyAnimateModel(config, transformer, device=offload_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def lora_patches(lora: dict) -> dict:
    """ModelPatcher patches (ComfyUI's LoRA adapter, patched on load, never merged) for a core LoRA."""
    from comfy.weight_adapter import LoRAAdapter

    return {
        f"diffusion_model.transformer.{path}.weight": LoRAAdapter(
            set(), (layer.up, layer.down, layer.alpha, None, None, None)
        )
        for path, layer in lora.items()
    }
