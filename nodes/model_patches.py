"""Nodes that change how our MODEL runs, for stock samplers too (a clone with transformer options; no new sampler).

EasyAnimate RIFLEx: one pass a little longer than the model was trained on (``easyanimate_core.context``).
"""

from __future__ import annotations

# The transformer option EasyAnimateNet reads (nodes/native_model.py): the frames the model was trained on.
RIFLEX_OPTION = "easyanimate_riflex_trained_frames"


class EasyAnimateRIFLEx:
    """RIFLEx on an EasyAnimate V5 / V5.1 MODEL: the temporal RoPE frequency whose period is nearest the trained length
    is lowered so a clip (or a context window) longer than ``trained_frames`` stays within one period."""

    CATEGORY = "EasyAnimate"
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
        if getattr(net, "version", None) not in ("V5", "V5.1"):
            raise ValueError(
                "EasyAnimate RIFLEx changes the temporal RoPE of an EasyAnimate V5 / V5.1 MODEL (from EasyAnimate "
                "Model Loader); V4 and other models have none: remove the node"
            )
        if (trained_frames - 1) % 4:
            raise ValueError(f"trained_frames {trained_frames} must be 4k + 1 (49 for the released models)")
        patched = model.clone()
        options = dict(patched.model_options.get("transformer_options", {}))
        options[RIFLEX_OPTION] = trained_frames
        patched.model_options["transformer_options"] = options
        return (patched,)


NODE_CLASS_MAPPINGS = {"EasyAnimateRIFLEx": EasyAnimateRIFLEx}
NODE_DISPLAY_NAME_MAPPINGS = {"EasyAnimateRIFLEx": "EasyAnimate RIFLEx (longer clips)"}
