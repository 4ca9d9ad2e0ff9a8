"""ComfyUI node classes of the EasyAnimate pack (classic V1 API).

Imported relatively by the pack's root ``__init__.py`` only when ComfyUI is importable; node modules
import ComfyUI (``comfy.*``, ``folder_paths``) and the core library as ``easyanimate_core``. Each module
below declares its own mappings; they are merged here, and a name defined twice is an error.
"""

from __future__ import annotations

from . import (
    conditioning,
    latents,
    loaders,
    model_patches,
    motion_control,
    multi_gpu,
    sampler,
    vae_nodes,
    web_routes,
)
from .common import install_example_inputs

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in (loaders, latents, vae_nodes, conditioning, sampler, model_patches, motion_control, multi_gpu):
    _clash = set(NODE_CLASS_MAPPINGS) & set(_module.NODE_CLASS_MAPPINGS)
    if _clash:
        raise RuntimeError(f"node names defined twice: {sorted(_clash)}")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

web_routes.register_routes()
install_example_inputs()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
