"""ComfyUI entry point of the EasyAnimate pack.

ComfyUI imports this folder as a package whose module name is the folder's full path (so the
name is not known in advance and may contain characters that are not identifiers). Everything
inside the pack is therefore imported *relatively* (``from .nodes import ...``), and the plain
PyTorch library ``easyanimate_core`` is registered under its own top-level name by
:func:`_register_core`, so that its absolute imports (``from easyanimate_core.ops import ...``)
and the nodes' ``import easyanimate_core`` work without putting this folder on ``sys.path``
(which would expose ``nodes``, ``tests`` and ``bench`` as top-level modules and shadow
ComfyUI's own ``nodes`` module for later importers).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_CORE = "easyanimate_core"


def _register_core() -> None:
    core_dir = os.path.join(_HERE, _CORE)
    loaded = sys.modules.get(_CORE)
    if loaded is not None:
        paths = [os.path.abspath(p) for p in getattr(loaded, "__path__", [])]
        if core_dir not in paths:
            logging.warning("[EasyAnimate] using %s already imported from %s, not %s", _CORE, paths, core_dir)
        return
    init_py = os.path.join(core_dir, "__init__.py")
    if os.path.isfile(init_py):
        spec = importlib.util.spec_from_file_location(_CORE, init_py, submodule_search_locations=[core_dir])
    else:  # no __init__.py yet: an empty package over the folder
        spec = importlib.machinery.ModuleSpec(_CORE, None, is_package=True)
        spec.submodule_search_locations = [core_dir]
    module = importlib.util.module_from_spec(spec)
    sys.modules[_CORE] = module
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_CORE]
        raise


_register_core()

# Inside ComfyUI, `comfy` is importable and the nodes load (an import error there must surface as
# ComfyUI's "IMPORT FAILED", so it is not caught). Outside it this file is still imported, e.g. by
# pytest as the parent package of tests/ (tests/__init__.py + this __init__.py make the checkout a
# package); the nodes, which need ComfyUI, are then not loaded.
if importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS: dict[str, type] = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
