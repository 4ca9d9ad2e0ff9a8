"""EasyAnimate Multi-GPU: our MODEL's transformer calls run on several local devices (sequence / CFG parallel).

The node returns a MODEL clone whose transformer option holds a ``ParallelRunner``; ``EasyAnimateNet.forward`` hands
each call to it instead of running the transformer itself. The runner drives a pool of worker processes
(``easyanimate_core.parallel.workers``: one per device, their own NCCL / gloo group), started on first use and kept
for later runs. The weights the workers hold are the MODEL's as ComfyUI patched them (LoRAs included, whether
patched into the weights or applied as each layer runs in lowvram mode); they are sent again when they change.
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass

import torch

from easyanimate_core.parallel import ParallelLayout
from easyanimate_core.parallel.workers import WorkerPool

from .common import CATEGORY
from .model_patches import _easyanimate_net, _with_transformer_option

PARALLEL_OPTION = "easyanimate_parallel"  # a ParallelRunner (EasyAnimateNet.forward reads it)

_pools: dict[tuple, WorkerPool] = {}  # by (layout, devices): started once, reused by later runs


def _pool(layout: ParallelLayout, devices: tuple[str, ...]) -> WorkerPool:
    pool = _pools.get((layout, devices))
    if pool is None or not pool.alive:
        pool = _pools[(layout, devices)] = WorkerPool(layout, list(devices))
    return pool


@atexit.register
def close_pools() -> None:
    """Stop every worker process (at exit; the workers also stop when this process's connection closes)."""
    for pool in _pools.values():
        pool.close()
    _pools.clear()


def parse_devices(text: str, count: int) -> tuple[str, ...]:
    """The node's ``devices`` input -> ``count`` device names ("auto": cuda:0..; "cpu": all on the CPU)."""
    text = text.strip()
    if text == "auto":
        found = torch.cuda.device_count()
        if found < count:
            raise ValueError(
                f"EasyAnimate Multi-GPU: the degrees need {count} GPUs but {found} were found; lower the degrees, "
                "or set devices to cpu (slow: for trying the graph)"
            )
        return tuple(f"cuda:{i}" for i in range(count))
    devices = (("cpu",) * count) if text == "cpu" else tuple(n.strip() for n in text.split(",") if n.strip())
    if len(devices) != count:
        raise ValueError(
            f"EasyAnimate Multi-GPU: devices lists {len(devices)} ({text!r}) but the degrees need {count}: one device "
            "a process, e.g. cuda:0,cuda:1"
        )
    for name in devices:
        try:
            torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"EasyAnimate Multi-GPU: devices: {name!r} is not a device name ({e})") from None
    return devices


def patched_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's weights as its layers compute with them: ComfyUI's per-layer patches (``weight_function``
    / ``bias_function`` of comfy.ops layers: a LoRA in lowvram mode) applied, on the CPU."""
    weights = {}
    for module_name, module in transformer.named_modules():
        for name, param in module.named_parameters(recurse=False):
            value = param.detach()
            functions = getattr(module, f"{name}_function", None) or []
            if functions:  # as comfy.ops does: patch a copy in the compute dtype
                value = value.to(torch.float32 if value.dtype.itemsize == 1 else value.dtype, copy=True)
                for function in functions:
                    value = function(value)
            weights[f"{module_name}.{name}" if module_name else name] = value.to("cpu")
    return weights


def weights_key(transformer: torch.nn.Module) -> tuple:
    """Changes when a weight is replaced or written in place (a LoRA patched in), or a layer's patches change.

    ComfyUI loads weights under inference mode, whose tensors keep no version counter: a write in place is seen in
    16 evenly spaced elements of each weight (a patch changes them all)."""
    pointers, samples, functions = [], [], []
    for module in transformer.modules():
        for param in module.parameters(recurse=False):
            flat = param.detach().reshape(-1)
            pointers.append(param.data_ptr())
            samples.append(flat[:: max(1, flat.numel() // 16)][:16].float().sum())
        functions.extend(id(f) for f in (getattr(module, "weight_function", None) or []))
    return tuple(pointers), tuple(torch.stack(samples).tolist()), tuple(functions)


@dataclass(frozen=True)
class ParallelRunner:
    """Runs one EasyAnimateNet transformer call on the worker pool of ``layout`` over ``devices``."""

    layout: ParallelLayout
    devices: tuple[str, ...]

    def __call__(self, net, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, extra: dict):
        if "step_cache" in extra:
            raise ValueError(
                "EasyAnimate Multi-GPU runs without the step cache: set EasyAnimate Speed's step_cache to 0, or "
                "remove one of the two nodes"
            )
        pool = _pool(self.layout, self.devices)
        key = weights_key(net.transformer)
        if pool.weights_key != key:
            pool.load(net.transformer.config, patched_weights(net.transformer), key)
        tensors = {k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}
        tensors.update(hidden_states=x, timestep=timesteps.expand(x.shape[0]), encoder_hidden_states=context)
        options = {"attention": net.attention_name}
        if extra.get("rope_temporal_frequency") is not None:
            options["rope_temporal_frequency"] = list(extra["rope_temporal_frequency"])
        return pool.forward(tensors, options).to(x.device, x.dtype)


class EasyAnimateMultiGPU:
    """Sample an EasyAnimate V5 / V5.1 MODEL on several GPUs of this machine: each step's video tokens are split over
    the GPUs (Ulysses: attention heads; ring: keys and values passed round) and/or the two guidance branches run
    side by side (CFG-parallel). Same result as one GPU; works with KSampler and every other sampler."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        degree = {"default": 1, "min": 1, "max": 8}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "an EasyAnimate V5 / V5.1 MODEL (EasyAnimate Model Loader)"}),
                "ulysses_degree": (
                    "INT",
                    {**degree, "default": 2, "tooltip": "GPUs sharing each attention's heads; divides the heads (48)"},
                ),
                "ring_degree": ("INT", {**degree, "tooltip": "GPUs passing keys and values round a ring"}),
                "cfg_parallel": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "the two guidance branches on their own GPUs (doubles the GPUs)"},
                ),
                "devices": (
                    "STRING",
                    {
                        "default": "auto",
                        "tooltip": "auto: cuda:0, cuda:1, ... (ulysses x ring x (2 with cfg_parallel) of them); or a "
                        "list such as cuda:1,cuda:2; cpu runs the processes on the CPU (slow: for trying a graph)",
                    },
                ),
            }
        }

    def patch(self, model, ulysses_degree: int, ring_degree: int, cfg_parallel: bool, devices: str):
        net = getattr(model.model, "diffusion_model", None)
        if getattr(net, "version", None) == "V4":
            raise ValueError("EasyAnimate Multi-GPU runs V5 / V5.1 models; this is a V4 MODEL")
        net = _easyanimate_net(model, ("V5.1", "V5"), "EasyAnimate Multi-GPU")
        if any(not p.is_floating_point() for p in net.transformer.parameters()):
            raise ValueError("EasyAnimate Multi-GPU takes float weights; this MODEL is a quantized GGUF transformer")
        layout = ParallelLayout(ulysses_degree, ring_degree, 2 if cfg_parallel else 1)
        layout.check_heads(net.transformer.config.num_attention_heads)  # the tokens are checked at each call
        runner = ParallelRunner(layout, parse_devices(devices, layout.world_size))
        return (_with_transformer_option(model.clone(), PARALLEL_OPTION, runner),)


NODE_CLASS_MAPPINGS = {"EasyAnimateMultiGPU": EasyAnimateMultiGPU}
NODE_DISPLAY_NAME_MAPPINGS = {"EasyAnimateMultiGPU": "EasyAnimate Multi-GPU (sequence / CFG parallel)"}
