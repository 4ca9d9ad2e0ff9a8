"""Nodes that change how our MODEL runs, for stock samplers too (a clone with transformer options; no new sampler).

EasyAnimate RIFLEx: one pass a little longer than the model was trained on (``easyanimate_core.context``).
EasyAnimate Speed: step caching (TeaCache), CFG skipping and compiled blocks (``easyanimate_core.step_cache``,
``pipeline.cfg_skip_steps``, ``regional_compile``), with KSampler and every other ComfyUI sampler.
"""

from __future__ import annotations

import comfy.patcher_extension

from easyanimate_core.pipeline import cfg_skip_steps
from easyanimate_core.regional_compile import compiled_blocks
from easyanimate_core.step_cache import DEFAULT_THRESHOLD, StepCache, model_coefficients

from .common import CATEGORY, sampling_step

# Transformer options EasyAnimateNet reads (nodes/native_model.py).
RIFLEX_OPTION = "easyanimate_riflex_trained_frames"  # the frames the model was trained on
STEP_CACHE_OPTION = "easyanimate_step_cache"  # a StepCache (its state per branch and context window)
CFG_SKIP_KEY = "easyanimate_cfg_skip"


def _easyanimate_net(model, versions: tuple[str, ...], node: str):
    """The EasyAnimateNet of an EasyAnimate MODEL, or a ValueError naming the node and what it takes."""
    net = getattr(model.model, "diffusion_model", None)
    if getattr(net, "version", None) not in versions:
        raise ValueError(
            f"{node} takes an EasyAnimate {' / '.join(versions)} MODEL (from EasyAnimate Model Loader); this MODEL "
            "is not one: connect the EasyAnimate Model Loader's output"
        )
    return net


def _with_transformer_option(patched, key: str, value):
    """``patched`` (a fresh clone) with transformer option ``key`` set to ``value`` (removed for None); the
    options dict is copied, so the MODEL it was cloned from keeps its own."""
    options = {k: v for k, v in patched.model_options.get("transformer_options", {}).items() if k != key}
    if value is not None:
        options[key] = value
    patched.model_options["transformer_options"] = options
    return patched


def cfg_skip_wrapper(share: float, at: str):
    """A CALC_COND_BATCH wrapper: at the skipped steps only the conditional branch runs, and its prediction stands
    for the unconditional one too (so the guidance formula returns it unchanged)."""

    def wrapper(executor, model, conds, x_in, timestep, model_options):
        step = sampling_step(model_options.get("transformer_options", {}).get("sample_sigmas"), timestep)
        if len(conds) < 2 or conds[1] is None or step is None or step[0] not in cfg_skip_steps(step[1], share, at):
            return executor(model, conds, x_in, timestep, model_options)
        out = executor(model, [conds[0], *([None] * (len(conds) - 1))], x_in, timestep, model_options)
        return [out[0]] * len(conds)

    return wrapper


class EasyAnimateRIFLEx:
    """RIFLEx on an EasyAnimate V5 / V5.1 MODEL: the temporal RoPE frequency whose period is nearest the trained length
    is lowered so a clip (or a context window) longer than ``trained_frames`` stays within one period."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "an EasyAnimate V5 / V5.1 MODEL (EasyAnimate Model Loader)"}),
                "trained_frames": (
                    "INT",
                    {
                        "default": 49,
                        "min": 5,
                        "max": 1025,
                        "step": 4,
                        "tooltip": "frames the model was trained on (49 for the released V5 / V5.1; 17 for the "
                        "micro model); clips up to this long run unchanged",
                    },
                ),
            }
        }

    def patch(self, model, trained_frames: int):
        net = getattr(model.model, "diffusion_model", None)
        if getattr(net, "version", None) == "V4":
            raise ValueError("EasyAnimate RIFLEx changes the temporal RoPE of V5 / V5.1; V4 has none: remove the node")
        _easyanimate_net(model, ("V5.1", "V5"), "EasyAnimate RIFLEx")
        if (trained_frames - 1) % 4:
            raise ValueError(f"trained_frames {trained_frames} must be 4k + 1 (49 for the released models)")
        return (_with_transformer_option(model.clone(), RIFLEX_OPTION, trained_frames),)


class EasyAnimateSpeed:
    """Faster sampling with any ComfyUI sampler: skip the transformer blocks at steps whose input changed little
    (step caching), run some steps without the unconditional branch (CFG skipping), compile the blocks."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "an EasyAnimate MODEL (EasyAnimate Model Loader)"}),
                "step_cache": (
                    "FLOAT",
                    {
                        "default": DEFAULT_THRESHOLD,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "TeaCache threshold: higher skips more block passes and drifts more; 0 turns it "
                        "off. Uses the model's polynomial: published for V5.1-12B / 7B and V5-7B, the micro model "
                        "ships its own; others need bench/fit_step_cache.py",
                    },
                ),
                "cfg_skip": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 0.9,
                        "step": 0.05,
                        "tooltip": "share of the steps run without the unconditional branch (each such step costs "
                        "half); 0 turns it off",
                    },
                ),
                "cfg_skip_at": (["end", "start"], {"tooltip": "whether CFG skipping takes the last or first steps"}),
                "compile": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "torch.compile each transformer block (the first step is slower)"},
                ),
            }
        }

    def patch(self, model, step_cache: float, cfg_skip: float, cfg_skip_at: str, compile: bool):
        net = _easyanimate_net(model, ("V5.1", "V5", "V4"), "EasyAnimate Speed")
        cfg_skip_steps(1, cfg_skip, cfg_skip_at)  # a bad share fails here, not at the first step
        cache = None
        if step_cache > 0:
            config = net.transformer.config
            inner = config.num_attention_heads * config.attention_head_dim
            cache = StepCache(model_coefficients(net.folder, net.version, config.num_layers, inner), step_cache)
        patched = _with_transformer_option(model.clone(), STEP_CACHE_OPTION, cache)
        if cfg_skip > 0:
            wrapper = cfg_skip_wrapper(cfg_skip, cfg_skip_at)
            comfy.patcher_extension.add_wrapper_with_key(
                comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, CFG_SKIP_KEY, wrapper, patched.model_options, True
            )
        if compile:  # object patches: the loaded model itself stays eager for other branches of the graph
            for path, block in compiled_blocks(net.transformer).items():
                patched.add_object_patch(f"diffusion_model.transformer.{path}", block)
        return (patched,)


NODE_CLASS_MAPPINGS = {"EasyAnimateRIFLEx": EasyAnimateRIFLEx, "EasyAnimateSpeed": EasyAnimateSpeed}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateRIFLEx": "EasyAnimate RIFLEx (longer clips)",
    "EasyAnimateSpeed": "EasyAnimate Speed (step cache, CFG skip, compile)",
}
