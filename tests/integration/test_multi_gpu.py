"""EasyAnimate Multi-GPU in a real ComfyUI server: the stock KSampler's MODEL calls run on 2 worker processes (gloo
on the CPU here) and give the latents of the one-process run."""

from __future__ import annotations

import uuid

import pytest
import torch
from comfy_harness import ComfyError
from safetensors.torch import load_file
from test_speed_nodes import graph

pytestmark = pytest.mark.integration


def latent(server, parallel: dict | None) -> torch.Tensor:
    """test_speed_nodes' micro-model KSampler graph, its MODEL through EasyAnimate Multi-GPU when ``parallel``."""
    prefix = uuid.uuid4().hex[:8]
    nodes = graph(prefix, None)
    if parallel:
        settings = {"ulysses_degree": 1, "ring_degree": 1, "cfg_parallel": False, "devices": "cpu", **parallel}
        nodes["7"] = {"class_type": "EasyAnimateMultiGPU", "inputs": {"model": ["1", 0], **settings}}
        nodes["6"]["inputs"]["model"] = ["7", 0]
    files = server.output_files(server.run_prompt(nodes, timeout=900))
    [file] = [f for f in files if f.name.startswith(prefix)]
    return load_file(file)["latent_tensor"]


def test_two_worker_processes_give_the_latents_of_one(comfy_server):
    plain = latent(comfy_server, None)
    assert plain.abs().max() > 0.1
    for parallel in ({"ulysses_degree": 2}, {"cfg_parallel": True}, {"ring_degree": 2}):
        torch.testing.assert_close(latent(comfy_server, parallel), plain, atol=1e-4, rtol=1e-4, msg=str(parallel))


def test_a_bad_degree_is_a_node_error(comfy_server):
    prefix = uuid.uuid4().hex[:8]
    nodes = graph(prefix, None)
    settings = {"ulysses_degree": 3, "ring_degree": 1, "cfg_parallel": False, "devices": "cpu"}
    nodes["7"] = {"class_type": "EasyAnimateMultiGPU", "inputs": {"model": ["1", 0], **settings}}
    nodes["6"]["inputs"]["model"] = ["7", 0]
    with pytest.raises(ComfyError, match="Ulysses degree 3 does not divide the model's 4 attention heads"):
        comfy_server.run_prompt(nodes, timeout=300)
