"""Fixtures shared by the node tests (the comfy stand-in lives in tests/comfy_standin.py)."""

from tests.comfy_standin import nodes, tiny_folders  # noqa: F401  (pytest fixtures, found by name)
