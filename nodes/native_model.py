"""EasyAnimate V5.1 / V5 / V4 / V3 / V2 / V1 as a native ComfyUI MODEL (a ModelPatcher over a comfy BaseModel).

Choice: the BaseModel is built with ``disable_unet_model_creation`` and its ``diffusion_model`` is set
to our transformer, loaded by ``easyanimate_core.loading.load_transformer`` with the comfy.ops
namespace that ``comfy.ops.pick_operations`` picks (as ``comfy.sd.load_diffusion_model_state_dict``
does). Our loader builds on the meta device and assigns every tensor, so weights are read once and
never materialised twice; ComfyUI's own ``BaseModel`` constructor would build with random weights first.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models_base
import folder_paths
import torch

from easyanimate_core.attention import sdpa_attention, using_attention
from easyanimate_core.camera import CAMERA_CHANNELS
from easyanimate_core.context import reference_at_first_frame, riflex_frequency
from easyanimate_core.loading import inspect_checkpoint, load_transformer
from easyanimate_core.pipeline import CLIP_APPLY_RATIO, PIXART_VERSIONS, clip_active, model_inputs, model_version
from easyanimate_core.preview import LatentRGB, latent_rgb_for_checkpoint
from easyanimate_core.sampling import SCHEDULES, FlowSchedule
from easyanimate_core.transformer import EasyAnimateTransformer3D
from easyanimate_core.transformer_v3 import CLIP_EMBED_DIM, CLIP_TOKENS, EasyAnimateV3Transformer3D
from easyanimate_core.transformer_v4 import EasyAnimateV4Transformer3D
from easyanimate_core.vae import VAE_V4, VAE_V51

from .common import NATIVE_VERSIONS, VAE_CONFIGS, sampling_step
from .model_patches import RIFLEX_OPTION, STEP_CACHE_OPTION
from .multi_gpu import PARALLEL_OPTION

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
    "easyanimate_text_mask": "text_embedding_mask",  # V4 reads its token masks (padding gets a learned table)
    "easyanimate_text_2_mask": "text_embedding_mask_t5",
    "easyanimate_inpaint_latents": "inpaint_latents",
    "easyanimate_control_latents": "control_latents",
    "easyanimate_clip": "clip_encoder_hidden_states",  # V4 image-to-video: the start image's CLIP features
    "easyanimate_clip_weight": "clip_weight",  # 1 on the positive branch, 0 on the negative (its mask)
}


# Conditioning keys whose latents must cover the sampled latent's grid, and the node that sets each.
LATENT_CONDS = {
    "easyanimate_inpaint_latents": "EasyAnimate Image To Video",
    "easyanimate_control_latents": "EasyAnimate Control Video",
}


class EasyAnimateLatentFormat(comfy.latent_formats.LatentFormat):
    """The mag VAE's 16-channel video latents; model space = VAE space x scaling_factor (the released 0.7125, or
    the one in the config of the model folder's own vae/: the micro model's differs).

    Live previews (ComfyUI's latent2rgb) need latent-to-RGB factors, which depend on the VAE's weights: they are
    fitted from a VAE (``easyanimate_core.preview``) the first time ComfyUI's previewer reads them, then kept in
    memory and in <user directory>/easyanimate/latent_rgb/ (a few seconds once per VAE file). Which VAE: the
    model folder's own vae/ (``load_native_model`` calls ``attach_vae_near``), so a plain text-to-video workflow
    previews on its first run whatever order ComfyUI runs the loaders in (a VAE loader may run after KSampler);
    for a transformer loaded from a single file, the VAE the EasyAnimate VAE Loader loaded last (``recent_vae``).
    Lazy, because with previews off (ComfyUI's default) the factors are never read and nothing is fitted; a
    failed fit logs a warning and leaves the preview off, never the sampling.
    """

    latent_channels = VAE_V51.latent_channels
    latent_dimensions = 3
    scale_factor = VAE_V51.scaling_factor
    vae_source: Path | None = None  # a model folder with vae/, set per instance by attach_vae_near
    recent_vae: Path | None = None  # class-wide: the last 16-channel VAE the EasyAnimate VAE Loader loaded

    def attach_vae_near(self, path) -> None:
        """Take the vae/ of the model folder ``path`` (or of the parent of its transformer/): its scaling factor, and
        the previews fitted from it."""
        path = Path(path)
        if path.is_dir():
            self.vae_source = next((root for root in (path, path.parent) if (root / "vae").is_dir()), None)
        if self.vae_source is None:
            return
        try:
            self.scale_factor = inspect_checkpoint(self.vae_source, "vae").config.scaling_factor
        except ValueError as error:  # another VAE may be used with this model: keep the released factor
            message = "EasyAnimate: %s/vae is unreadable (%s); latents use scaling %s"
            logging.warning(message, self.vae_source, error, self.scale_factor)

    @property
    def latent_rgb_factors(self):
        fit = self.latent_rgb()
        return None if fit is None else fit.factors

    @property
    def latent_rgb_factors_bias(self):
        fit = self.latent_rgb()
        return None if fit is None else fit.bias

    def latent_rgb(self) -> LatentRGB | None:
        """The preview map for model-space latents, fitted on first use; None without a VAE (or when the fit fails)."""
        source = self.vae_source or EasyAnimateLatentFormat.recent_vae
        if source is None:
            return None
        done = self.__dict__.get("_latent_rgb")
        if done is not None and done[0] == source:
            return done[1]
        try:
            cache = os.path.join(folder_paths.get_user_directory(), "easyanimate", "latent_rgb")
            fit = latent_rgb_for_checkpoint(source, cache)
            fit = fit.scaled(self.scale_factor) if len(fit.factors) == self.latent_channels else None
        except Exception as error:  # a preview must never stop sampling
            logging.warning(
                "EasyAnimate: no latent previews; fitting colours from the VAE at %s failed: %s", source, error
            )
            fit = None
        self._latent_rgb = (source, fit)
        return fit


class EasyAnimateV4LatentFormat(EasyAnimateLatentFormat):
    """The slice VAE's 4-channel latents of V4 (model space = VAE space x its scaling factor)."""

    latent_channels = VAE_V4.latent_channels
    scale_factor = VAE_V4.scaling_factor
    recent_vae = None  # its own: a 16-channel VAE's colours never fit these latents


class EasyAnimatePixArtLatentFormat(EasyAnimateLatentFormat):
    """The 4-channel latents of V1-V3 (SD image VAE, V2 MagViT, V3 slice VAE); the model folder's vae/config.json
    gives the scaling factor (``attach_vae_near``)."""

    latent_channels = VAE_CONFIGS["V3"].latent_channels
    scale_factor = VAE_CONFIGS["V3"].scaling_factor
    recent_vae = None  # its own: a 16-channel VAE's colours never fit these latents


LATENT_FORMATS = {"V5.1": EasyAnimateLatentFormat, "V5": EasyAnimateLatentFormat, "V4": EasyAnimateV4LatentFormat}
LATENT_FORMATS.update(dict.fromkeys(PIXART_VERSIONS, EasyAnimatePixArtLatentFormat))


def sampling_settings(version: str) -> tuple[comfy.model_base.ModelType, dict]:
    """ComfyUI model type and sampling settings equal to the version's released schedule."""
    schedule = SCHEDULES[version]
    if isinstance(schedule, FlowSchedule):
        # ModelSamplingDiscreteFlow: sigma(t) = time_snr_shift(shift, t / 1000) = s t / (1 + (s - 1) t), which is
        # our e^mu / (e^mu + 1/t - 1) for s = e^mu; the model is fed sigma * multiplier = sigma * 1000 as ours.
        return comfy.model_base.ModelType.FLOW, {"shift": math.exp(schedule.mu), "multiplier": 1000}
    if schedule.prediction == "epsilon":  # V1-V3: epsilon prediction on plain linear betas
        return comfy.model_base.ModelType.EPS, {
            "beta_schedule": "sqrt_linear",  # comfy's "sqrt_linear" is the plain linear schedule
            "linear_start": schedule.beta_start,
            "linear_end": schedule.beta_end,
        }
    # V5 / V4: v-prediction on the scaled_linear betas (V5's rescaled to zero terminal SNR).
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
        self.latent_format = LATENT_FORMATS[version]()  # BASE.__init__ instantiated the class attribute
        self.model_type, settings = sampling_settings(version)
        self.sampling_settings = settings


class EasyAnimateNet(torch.nn.Module):
    """ComfyUI's diffusion-model call ``(x, timesteps, context, **conds)`` onto our transformer."""

    def __init__(self, transformer: EasyAnimateTransformer3D | EasyAnimateV4Transformer3D | EasyAnimateV3Transformer3D):
        super().__init__()
        self.transformer = transformer
        self.version = model_version(transformer)
        self.latent_format = LATENT_FORMATS[self.version]
        self.inpaint_channels, self.control_channels = model_inputs(transformer, self.latent_format.latent_channels)
        self.attention, self.attention_name = sdpa_attention, "sdpa"  # the Model Loader's attention input
        self.folder: Path | None = None  # where the weights came from (a step_cache.json beside them)

    @property
    def dtype(self) -> torch.dtype:
        # The first floating weight: a GGUF model's Linear weights are bytes (uint8) until their layer runs.
        return next(p.dtype for p in self.transformer.parameters() if p.is_floating_point())

    def text_widths(self) -> tuple[int, int | None]:
        """Widths of the first text stream (Qwen2-VL or BERT) and of the second (mT5; None for V5.1)."""
        config = self.transformer.config
        if self.version == "V4":
            return config.cross_attention_dim, config.cross_attention_dim_t5
        if self.version in PIXART_VERSIONS:
            return config.caption_channels, None
        return config.text_embed_dim, config.text_embed_dim_t5

    @property
    def clip_tokens(self) -> int:
        """The tokens the start image's CLIP features become: V4's n_query, V3's 8."""
        return CLIP_TOKENS if self.version in PIXART_VERSIONS else self.transformer.config.n_query

    @property
    def variant(self) -> str:
        """ "InP", "Control", "Camera" or "T2V": what the extra input channels say."""
        if self.control_channels == CAMERA_CHANNELS + self.latent_format.latent_channels:
            return "Camera"
        return "InP" if self.inpaint_channels else "Control" if self.control_channels else "T2V"

    def forward(self, x, timesteps, context=None, control=None, transformer_options=None, **kwargs):
        extra = {name: kwargs[name] for name in COND_TO_KWARG.values() if kwargs.get(name) is not None}
        window = (transformer_options or {}).get("context_window")
        for name in ("inpaint_latents", "control_latents"):
            value = extra.get(name)
            if window is not None and value is not None and value.shape[2] != x.shape[2]:
                # ComfyUI's context windows (0.3.x) cut the noise but not 5-D conditioning: cut it the same way.
                extra[name] = value[:, :, list(window.index_list)]
        reference = kwargs.get("reference_latents")
        if reference is not None:  # V5.1 Control: the reference image at the first frame of the clip / each window
            extra["control_latents"] = torch.cat(
                [extra["control_latents"], reference_at_first_frame(reference, x.shape[2])], 1
            )
        clip, clip_weight = extra.pop("clip_encoder_hidden_states", None), extra.pop("clip_weight", None)
        if clip is not None and self.clip_step(transformer_options, CLIP_APPLY_RATIO.get(self.version, 0.0)):
            extra["clip_encoder_hidden_states"] = clip
            extra["clip_attention_mask"] = clip_weight.to(clip)[:, None].expand(clip.shape[0], self.clip_tokens)
        elif self.version in PIXART_VERSIONS and self.transformer.config.has_clip:
            # V3 InP: where no features are read, the official pipeline feeds zero features with a zero mask.
            extra["clip_encoder_hidden_states"] = x.new_zeros(x.shape[0], CLIP_EMBED_DIM)
            extra["clip_attention_mask"] = x.new_zeros(x.shape[0], CLIP_TOKENS)
        if self.version in PIXART_VERSIONS and "text_embedding_mask" in extra:  # V1-V3: the T5 mask, so named
            extra["encoder_attention_mask"] = extra.pop("text_embedding_mask")
        # Without images / a control video the official pipelines feed zeros (text-to-video on InP / Control models).
        for name, channels in (("inpaint_latents", self.inpaint_channels), ("control_latents", self.control_channels)):
            if channels and name not in extra:
                extra[name] = x.new_zeros(x.shape[0], channels, *x.shape[2:])
        options = transformer_options or {}
        cache = options.get(STEP_CACHE_OPTION)
        if cache is not None:
            i, steps = self.step_index(options) or (0, 1)
            branch = (tuple(options.get("cond_or_uncond", ())), tuple(window.index_list) if window else None)
            extra["step_cache"] = cache.for_call(branch, i, steps)
        trained = options.get(RIFLEX_OPTION)
        if trained is not None and x.shape[2] > VAE_CONFIGS[self.version].latent_frames(trained):
            head_dim = self.transformer.config.attention_head_dim
            latent = VAE_CONFIGS[self.version].latent_frames(trained)
            extra["rope_temporal_frequency"] = riflex_frequency(head_dim, latent, x.shape[2])
        runner = options.get(PARALLEL_OPTION)
        if runner is not None:  # EasyAnimate Multi-GPU: the call runs on its worker processes
            out = runner(self, x, timesteps, context, extra)
        else:
            with using_attention(self.attention):
                out = self.transformer(x, timesteps, context, **extra)
        return out[:, : x.shape[1]]  # a learned-sigma output carries extra channels

    @staticmethod
    def step_index(transformer_options: dict | None) -> tuple[int, int] | None:
        """(step, steps) of this model call in ComfyUI's sampling loop; None outside one."""
        options = transformer_options or {}
        return sampling_step(options.get("sample_sigmas"), options.get("sigmas"))

    @classmethod
    def clip_step(cls, transformer_options: dict | None, ratio: float = CLIP_APPLY_RATIO["V4"]) -> bool:
        """Whether this model call is in the last ``ratio`` of the steps, where V4 (40 %) and V3 (50 %) read the
        CLIP features (official)."""
        step = cls.step_index(transformer_options)
        return True if step is None else clip_active(*step, ratio)  # outside a sampling loop: always


# Peak activation memory of one forward (no_grad) per token x inner width x element of the compute dtype, measured
# on CPU with bench/measure_transformer_memory.py for 16-1792 image tokens + 256 text tokens at widths 128 and
# 512: 8.7-11.2 in float32 and 14.4-14.6 in bfloat16 (norms and RoPE run in float32). Attention never holds the
# tokens^2 scores (flash / memory-efficient SDPA), so it is linear in tokens; 16 leaves a margin.
ACTIVATION_BYTES_PER_TOKEN = 16


class EasyAnimateModel(comfy.model_base.BaseModel):
    """BaseModel whose diffusion_model is an already-loaded EasyAnimate transformer."""

    def __init__(self, model_config: EasyAnimateModelConfig, transformer: EasyAnimateTransformer3D, device=None):
        super().__init__(model_config, model_config.model_type, device=device)
        self.diffusion_model = EasyAnimateNet(transformer)
        self.info = transformer.info

    def memory_required(self, input_shape, cond_shapes=None):
        """Bytes of activations for one model call on latents ``input_shape`` (what load_models_gpu reserves)."""
        net = self.diffusion_model
        config = net.transformer.config
        batch, _, frames, height, width = input_shape
        p = config.patch_size
        # Qwen2-VL, or BERT + mT5 (V5, V4), or T5 + 8 CLIP tokens (V1-V3)
        text_tokens = 128 if net.version in PIXART_VERSIONS else 256 + (77 if net.text_widths()[1] is not None else 0)
        tokens = frames * (height // p) * (width // p) + text_tokens
        dtype = self.manual_cast_dtype or self.diffusion_model.dtype
        return ACTIVATION_BYTES_PER_TOKEN * batch * tokens * config.inner_dim * max(2, dtype.itemsize)

    def extra_conds(self, **kwargs):
        # Called once per conditioning before the first step: refuse a mismatch here, not inside step 1.
        if kwargs.get("noise") is not None:
            error = conditioning_error(self.diffusion_model, kwargs, kwargs["noise"].shape)
            if error:
                raise ValueError(error)
        out = super().extra_conds(**kwargs)
        for key, kwarg in COND_TO_KWARG.items():
            value = kwargs.get(key)
            if value is not None:
                if key == "easyanimate_control_latents":
                    value = fit_control_latents(value, self.diffusion_model.control_channels)
                    latent = self.diffusion_model.latent_format.latent_channels
                    if value.shape[1] in (2 * latent, CAMERA_CHANNELS + latent):  # V5.1 Control / Control-Camera
                        # V5.1: the reference slot holds one image at latent frame 0. Kept apart, one frame long, so
                        # that context windows cut only the control video and every window gets the reference.
                        out["reference_latents"] = comfy.conds.CONDRegular(value[:, -latent:, :1])
                        value = value[:, :-latent]
                out[kwarg] = comfy.conds.CONDRegular(value)
        return out


def _describe_grid(shape, version: str = "V5.1") -> str:
    """Latent grid [.., T, h, w] as the video it stands for ("9 frames at 64x32")."""
    vae = VAE_CONFIGS[version]
    s = vae.spatial_compression
    return f"{vae.video_frames(shape[-3])} frames at {shape[-1] * s}x{shape[-2] * s}"


def conditioning_error(net: EasyAnimateNet, cond: dict, latent_shape) -> str | None:
    """Why one conditioning dict cannot drive ``net`` on latents of ``latent_shape``, or None if it can."""
    width, width_2 = net.text_widths()
    context = cond.get("cross_attn")
    if context is not None and context.shape[-1] != width:
        return (
            f"the prompt embeddings are {context.shape[-1]} wide but this {net.version} {net.variant} model takes "
            f"{width}: encode the prompt with the text encoder of the same EasyAnimate version "
            "(EasyAnimate Text Encoder Loader on the model's folder)"
        )
    if (width_2 is not None) != (cond.get("easyanimate_text_2") is not None):
        needs = "needs" if width_2 is not None else "takes no"
        return (
            f"this {net.version} model {needs} the second (mT5) text stream of V4 / V5: encode the prompt with the "
            "text encoder of the same EasyAnimate version"
        )
    if net.version == "V4" and cond.get("easyanimate_text_mask") is None:
        return (
            "this V4 model reads the prompt's token masks, which this conditioning lacks (a BERT + mT5 folder without "
            "a V4 transformer beside it is taken as V5's): load the text encoder from the V4 model folder itself"
        )
    if net.version in PIXART_VERSIONS and cond.get("easyanimate_text_mask") is None:
        return (
            f"this {net.version} model reads the T5 prompt's token mask, which this conditioning lacks: encode the "
            "prompt with EasyAnimate Text Encode on the text encoder of a V1-V3 model folder"
        )
    inpaint, control = cond.get("easyanimate_inpaint_latents"), cond.get("easyanimate_control_latents")
    if control is not None and not net.control_channels:
        return (
            f"control latents (from EasyAnimate Control Video) need an EasyAnimate Control model, but this model "
            f"is {net.variant}: load a -Control checkpoint (e.g. EasyAnimateV5.1-12b-zh-Control), or use "
            "EasyAnimate Image To Video / Video To Video with this one"
        )
    if inpaint is not None and not net.inpaint_channels:
        return (
            f"start/end image latents (from EasyAnimate Image To Video) need an EasyAnimate InP model, but this "
            f"model is {net.variant}: load an -InP checkpoint, or use a reference image on EasyAnimate Control "
            "Video with a V5.1 Control model"
        )
    for key, node in LATENT_CONDS.items():
        value = cond.get(key)
        if value is not None and tuple(value.shape[2:]) != tuple(latent_shape[2:]):
            return (
                f"the {node} conditioning was made for {_describe_grid(value.shape, net.version)} but the latent to "
                f"sample is {_describe_grid(latent_shape, net.version)}: sample that node's LATENT output, or give "
                "both the same width, "
                "height and frames"
            )
    if inpaint is not None and inpaint.shape[1] != net.inpaint_channels:
        return f"inpaint latents have {inpaint.shape[1]} channels; this model takes {net.inpaint_channels}"
    if control is not None:
        channels, latent = control.shape[1], net.latent_format.latent_channels
        camera_model = net.control_channels == CAMERA_CHANNELS + latent
        if camera_model and channels != net.control_channels:
            return (
                "this is a V5.1 Control-Camera model: it follows camera poses, not a control video. Use EasyAnimate "
                "Camera Control (with EasyAnimate Camera Motion or Camera From File)"
            )
        if channels == CAMERA_CHANNELS + latent and not camera_model:
            return (
                f"camera conditioning (from EasyAnimate Camera Control) needs a V5.1 Control-Camera model, but this is "
                f"a {net.variant} model: load a -Control-Camera checkpoint, or use EasyAnimate Control Video"
            )
        if channels == 2 * latent and net.control_channels == latent:
            return (
                "this V5 Control model takes no reference image (V5.1 Control models do): disconnect ref_image "
                "from EasyAnimate Control Video"
            )
        if channels not in (net.control_channels, net.control_channels // 2):
            return f"control latents have {channels} channels; this model takes {net.control_channels}"
    return None


def fit_control_latents(latents: torch.Tensor, channels: int) -> torch.Tensor:
    """Control latents made without a reference image, given the all-zero reference a V5.1 Control model reads."""
    missing = channels - latents.shape[1]
    return (
        latents
        if missing <= 0
        else torch.cat([latents, latents.new_zeros(latents.shape[0], missing, *latents.shape[2:])], 1)
    )


def load_native_model(path, weight_dtype: str = "default") -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over our transformer at ``path``, with dtypes and operations picked as comfy.sd does."""
    info = inspect_checkpoint(path, "transformer")
    if info.version not in NATIVE_VERSIONS:
        raise ValueError(f"{path} holds an EasyAnimate {info.version} transformer; this loader takes {NATIVE_VERSIONS}")
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
    model.diffusion_model.folder = Path(path)
    model.latent_format.attach_vae_near(path)  # this folder's VAE: latent scaling, live previews
    return EasyAnimatePatcher(model, load_device=load_device, offload_device=offload_device)


class EasyAnimatePatcher(comfy.model_patcher.ModelPatcher):
    """ComfyUI's ModelPatcher for our MODEL; refuses a set of weight patches that is empty.

    ComfyUI's stock LoRA loaders (LoraLoader / LoraLoaderModelOnly) build their key map from ComfyUI's own model
    classes and state-dict names; the names of EasyAnimate LoRA files (official kohya, peft, diffusers) are not
    among them, so every key is logged as not loaded and the loader passes no patch at all. Without this the
    run would succeed with the LoRA silently ignored (ComfyUI's other callers always pass at least one patch).
    """

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        if not patches:
            raise ValueError(
                "this LoRA matched no layer of the EasyAnimate MODEL (ComfyUI logged its keys as 'lora key not "
                "loaded'): ComfyUI's LoRA loaders do not know EasyAnimate's LoRA key names. Load it with "
                "EasyAnimate LoRA Loader, which reads official (kohya), peft and diffusers LoRAs"
            )
        return super().add_patches(patches, strength_patch, strength_model)


def lora_patches(lora: dict) -> dict:
    """ModelPatcher patches (ComfyUI's LoRA adapter, patched on load, never merged) for a core LoRA."""
    from comfy.weight_adapter import LoRAAdapter

    return {
        f"diffusion_model.transformer.{path}.weight": LoRAAdapter(
            set(), (layer.up, layer.down, layer.alpha, None, None, None)
        )
        for path, layer in lora.items()
    }
