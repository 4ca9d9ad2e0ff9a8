"""GGUF transformer files: read one like a safetensors header (names, shapes, formats, one tensor at a time) and
write one from any transformer we load (``easyanimate quantize``). Needs the ``gguf`` package (pip install gguf).

    header = GGUFHeader(path)       .shapes / .dtypes / .file_of / .read(None, key) / .quantized(key)
    write_gguf(path, state_dict, kind, metadata)    weights whose rows fit the blocks in ``kind``, the rest F32

Tensor names are ours (the official layout), so detection, key checks and errors are the safetensors ones; shapes
are torch's order (GGUF stores them reversed). The model's config JSON and what was quantized go in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .blocks import BLOCK, SUPPORTED, quantize

ARCHITECTURE = "easyanimate"
KINDS = ("Q8_0", "Q5_K", "Q4_K", "F16")  # what ``easyanimate quantize`` writes


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ValueError("reading or writing .gguf files needs the gguf package: pip install gguf") from e
    return gguf


class GGUFHeader:
    """A GGUF file's tensors, with the interface of loading._Header (reads copy out of the file's memory map)."""

    def __init__(self, path: Path):
        gguf = _gguf()
        self.files = [path]
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError, struct or numpy errors on damaged files
            raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); download it again") from e
        self.shapes, self.dtypes, self.file_of, self._tensors = {}, {}, {}, {}
        for tensor in self._reader.tensors:
            kind = tensor.tensor_type.name
            if kind not in SUPPORTED:
                raise ValueError(
                    f"{path}: tensor {tensor.name} is stored as {kind}, which this pack does not read (it reads "
                    f"{', '.join(SUPPORTED)}): write the file again with easyanimate quantize --type Q8_0 / Q5_K / Q4_K"
                )
            self.shapes[tensor.name] = tuple(int(n) for n in reversed(tensor.shape.tolist()))
            self.dtypes[tensor.name] = kind
            self.file_of[tensor.name] = path
            self._tensors[tensor.name] = tensor
        self.config = {}
        field = self._reader.fields.get(f"{ARCHITECTURE}.config")
        if field is not None:
            self.config = json.loads(bytes(field.parts[field.data[0]]).decode("utf-8"))

    def quantized(self, key: str) -> bool:
        return self.dtypes[key] in BLOCK

    def read(self, fh, key: str) -> torch.Tensor:
        """A float tensor in its stored dtype, or a quantized one's bytes (uint8 [rows, bytes per row])."""
        data = torch.from_numpy(self._tensors[key].data.copy())
        if self.quantized(key):
            return data.view(torch.uint8)
        from .blocks import FLOAT

        return data.view(torch.uint8).view(FLOAT[self.dtypes[key]]).reshape(self.shapes[key])


def quantizable(key: str, tensor: torch.Tensor, kind: str) -> bool:
    """Whether ``kind`` stores this tensor: Linear weights (2-D) whose rows fill whole blocks; F16 takes every float."""
    if kind == "F16":
        return tensor.ndim >= 2
    return tensor.ndim == 2 and key.endswith(".weight") and tensor.shape[1] % BLOCK[kind][0] == 0


def write_gguf(path: Path, state_dict: dict[str, torch.Tensor], kind: str, metadata: dict) -> dict[str, int]:
    """Write ``state_dict`` to the GGUF file ``path`` (the caller picks a temporary name and renames); returns how
    many tensors went into each format."""
    gguf = _gguf()
    if kind not in KINDS:
        raise ValueError(f"--type {kind}: choose one of {', '.join(KINDS)}")
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.config", json.dumps(metadata.get("config", {})))
    for name, value in metadata.items():
        if name != "config":
            writer.add_string(f"{ARCHITECTURE}.{name}", str(value))
    counts: dict[str, int] = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().float().cpu()
        stored = kind if quantizable(key, tensor, kind) else "F32"
        if stored in BLOCK:
            raw = quantize(tensor, stored).numpy()
            writer.add_tensor(key, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, stored))
        elif stored == "F16":
            writer.add_tensor(key, tensor.half().numpy())
        else:
            writer.add_tensor(key, tensor.numpy())
        counts[stored] = counts.get(stored, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
