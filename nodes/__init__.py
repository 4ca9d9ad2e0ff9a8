"""ComfyUI node classes of the EasyAnimate pack (classic V1 API).

Imported relatively by the pack's root ``__init__.py``; import ComfyUI modules (``comfy.*``,
``folder_paths``) inside node modules only, and the core library as ``easyanimate_core``.
Nodes are added in a later issue; the mappings are empty for now.
"""

from __future__ import annotations

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
