"""Server routes for the pack's frontend extension (web/js/easyanimate.js).

The frame and size rules live in the VAE configs; the frontend fetches them from here instead of keeping its
own copy, so widget snapping can never disagree with the validation in the nodes.
"""

from __future__ import annotations

import sys

from .common import VAE_CONFIGS, frame_rule

RULES_ROUTE = "/easyanimate/video_rules"

# Frame rates the released models were trained at (spec easyanimate_arch.md 4.3): what a duration is shown in.
TRAINED_FPS = {"V1": 12, "V2": 24, "V3": 24, "V4": 24, "V5": 8, "V5.1": 8}
# Versions with InP / Control models, which the conditioning nodes (Image To Video, ...) serve; V1 and V2 released
# text-to-video models only, so their rules (V1: any frame count) must not loosen those nodes' snapping.
CONDITIONED_VERSIONS = ("V5.1", "V5", "V4", "V3")


def video_rules() -> dict[str, dict[str, int]]:
    """Per version: frame rule, pixel multiple, latent compression and trained fps, as the frontend needs them."""
    rules = {}
    for version, vae in VAE_CONFIGS.items():
        step, offset = frame_rule(vae)
        rules[version] = {
            "frame_step": step,
            "frame_offset": offset,
            "pixel_multiple": vae.pixel_multiple,
            "spatial_compression": vae.spatial_compression,
            "temporal_compression": vae.temporal_compression,
            "fps": TRAINED_FPS[version],
            "conditioning_nodes": version in CONDITIONED_VERSIONS,
        }
    return rules


def register_routes() -> None:
    """Add the rules route to ComfyUI's running server (also served under /api by ComfyUI).

    Only when a server exists: main.py imports ``server`` and creates the instance before loading custom nodes.
    A script that imports the pack without a server (tests, tools) must not import ``server`` itself: that import
    assumes main.py's start-up and can break ComfyUI's ``utils`` package for the rest of the process.
    """
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return

    @instance.routes.get(RULES_ROUTE)
    async def get_video_rules(request):
        from aiohttp import web

        return web.json_response(video_rules())
