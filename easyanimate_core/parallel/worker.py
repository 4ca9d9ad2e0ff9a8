"""One worker process of a ``WorkerPool`` (workers.py): ``python -m easyanimate_core.parallel.worker ADDRESS RANK
DEVICE DIST_PORT ULYSSES RING CFG`` with the connection key in the environment. Serves load / forward / exit."""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Client

import torch
from safetensors.torch import load_file

from ..attention import attention_backend, using_attention
from ..ops import manual_cast
from ..transformer import EasyAnimateTransformer3D, TransformerConfig
from .layout import ParallelLayout, init_distributed, make_groups
from .sequence import SequenceParallel, gather_branches
from .workers import KEY_VARIABLE, receive_message, send_message


def build_transformer(path: str, config: dict, device: torch.device) -> EasyAnimateTransformer3D:
    """The transformer with the weights at ``path``, stored in their own dtype; layers cast them to each call's
    dtype (the host may compute in bf16 over fp8-stored weights)."""
    weights = load_file(path, device=str(device))
    dtype = next(w.dtype for w in weights.values() if w.is_floating_point())
    with torch.device("meta"):
        model = EasyAnimateTransformer3D(TransformerConfig(**config), dtype=dtype, operations=manual_cast)
    model.load_state_dict(weights, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def serve(address: str, rank: int, device: str, dist_port: int, layout: ParallelLayout) -> None:
    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop(KEY_VARIABLE)))
    send_message(conn, {"rank": rank})
    try:
        device = init_distributed(
            torch.device(device), f"tcp://127.0.0.1:{dist_port}", rank=rank, world_size=layout.world_size
        )
        groups = make_groups(layout)
    except Exception as e:  # a bad device, a busy port: the host reports it
        send_message(conn, {"error": f"could not start on {device}: {e}"})
        return
    send_message(conn, {"done": True})
    sequence = {"sequence_parallel": SequenceParallel(groups)} if layout.sequence > 1 else {}
    model = None
    backends = {}  # attention backends by name, looked up once (a missing package is reported once, not per call)
    while True:
        try:
            header, tensors = receive_message(conn)
        except (EOFError, OSError):  # the host has gone
            break
        if header["op"] == "exit":
            break
        try:
            if header["op"] == "load":
                model = None  # free the old weights first
                model = build_transformer(header["path"], header["config"], device)
                send_message(conn, {"done": True})
                continue
            options = header["options"]
            inputs = {k: v.to(device) for k, v in tensors.items()}
            x = inputs.pop("hidden_states")
            batch = x.shape[0]
            split = layout.cfg == 2 and batch % 2 == 0  # ComfyUI batches [uncond ; cond]: one half per CFG rank
            if split:
                half = slice(groups.cfg_index * batch // 2, (groups.cfg_index + 1) * batch // 2)
                x = x[half]
                inputs = {k: v[half] if v.ndim and v.shape[0] == batch else v for k, v in inputs.items()}
            extra = {}
            if options.get("rope_temporal_frequency"):
                extra["rope_temporal_frequency"] = tuple(options["rope_temporal_frequency"])
            name = options.get("attention", "sdpa")
            if name not in backends:
                backends[name] = attention_backend(name)[0]
            attention = backends[name]
            with torch.no_grad(), using_attention(attention):
                out = model(x, **inputs, **extra, **sequence)
            if split:
                out = gather_branches(groups, out)
            send_message(conn, {"done": True}, {"out": out} if groups.is_first else None)
        except Exception as e:  # the host raises it; collectives after a failure would hang, so stop here
            send_message(conn, {"error": str(e) or type(e).__name__})
            break
    conn.close()
    torch.distributed.destroy_process_group()


def main(argv: list[str]) -> None:
    address, rank, device, dist_port, ulysses, ring, cfg = argv
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    serve(address, int(rank), device, int(dist_port), ParallelLayout(int(ulysses), int(ring), int(cfg)))


if __name__ == "__main__":
    main(sys.argv[1:])
