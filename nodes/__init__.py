"""ComfyUI node classes of the EasyAnimate pack (classic V1 API).

Imported relatively by the pack's root ``__init__.py`` only when ComfyUI is importable; node modules
import ComfyUI (``comfy.*``, ``folder_paths``) and the core library as ``easyanimate_core``.
"""

from __future__ import annotations

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
