"""Loading EasyAnimate checkpoints: one entry point for the transformer, one for the VAE.

    load_transformer(path, dtype=..., device=..., operations=...) -> EasyAnimateTransformer3D (V5 / V5.1)
                                                                     or EasyAnimateV4Transformer3D (V4)
                                                                     or EasyAnimateV3Transformer3D (V1-V3)
    load_vae(path, dtype=..., device=..., operations=...)         -> MagvitVAE (V4-V5.1)
                                                                     or ImageVAE (V1's per-frame SD VAE)
    inspect_checkpoint(path)                                      -> CheckpointInfo (no tensors read)

``path`` may be a model root (with ``transformer/`` and ``vae/`` folders, official or diffusers
layout), the ``transformer/`` or ``vae/`` folder itself (single or sharded safetensors), or one
``.safetensors`` file, with or without a ``config.json`` (or ``<name>.json``) beside it.

Version (V1 / V2 / V3 / V4 / V5 / V5.1), size and variant are read from tensor names and shapes; a config.json only
supplies what tensors cannot show (norm eps, flags). Every check runs on the safetensors headers
before a single weight is read; the model is built on the meta device and each tensor is assigned
in the target dtype as it is read, so peak RAM stays near one copy of the weights.
Only safetensors are read: pickle-based files (.bin, .pt, .ckpt, .pth) can run code when loaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .image_vae import ImageVAE, ImageVAEConfig, canonical_key
from .keys import diffusers_to_official, is_diffusers_layout, strip_wrapper_prefix
from .transformer import VARIANT_IN_CHANNELS, EasyAnimateTransformer3D, TransformerConfig
from .transformer_v3 import EasyAnimateV3Transformer3D, TransformerV3Config, config_from_state_dict
from .transformer_v4 import EasyAnimateV4Transformer3D, TransformerV4Config
from .vae import VAE_V2, VAE_V3, VAE_V4, VAE_V5, VAE_V51, MagvitVAE, VAEConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# Parts a full model folder carries beside the transformer and the VAE, per version.
PIPELINE_PARTS = {
    "V5.1": ["text_encoder", "tokenizer"],
    "V5": ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"],
    "V4": ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_encoder"],
    "V3": ["text_encoder", "tokenizer", "image_encoder"],  # T5; CLIP vision for the InP image input
    "V2": ["text_encoder", "tokenizer"],
    "V1": ["text_encoder", "tokenizer"],
}


@dataclass
class CheckpointInfo:
    """What a checkpoint is, read from its tensors: enough to pick the model class and config."""

    kind: str  # "transformer" | "vae"
    version: str  # "V1" | "V2" | "V3" | "V4" | "V5" | "V5.1"
    variant: str  # transformer: "T2V" | "InP" | "Control" | "Camera" | "custom"; VAE: its temporal_mode
    size: str  # "12B", "7B", or a parameter count for other geometries
    layout: str  # "official" | "diffusers"
    stored_dtype: str
    num_params: int
    files: list[Path]
    config: TransformerConfig | TransformerV4Config | TransformerV3Config | VAEConfig | ImageVAEConfig | None = None
    notes: list[str] = field(default_factory=list)
    weight_dtype: torch.dtype | None = None  # dtype of the main weights: what loading with dtype=None keeps
    ignored: list[str] = field(default_factory=list)  # listed tensors in the files no layer uses (never read)

    def summary(self) -> str:
        files = ", ".join(str(f) for f in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
        lines = [
            f"EasyAnimate {self.version} {self.kind}",
            f"  variant: {self.variant}",
            f"  size:    {self.size} ({self.num_params / 1e6:.1f} M parameters)",
            f"  layout:  {self.layout}",
            f"  dtype:   {self.stored_dtype}",
            f"  files:   {files}",
        ]
        lines += [f"  note:    {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


class _Header:
    """The tensor names, shapes, dtypes and byte ranges of one or more safetensors files.

    Parsed directly (the format is an 8-byte length, a JSON header, then raw little-endian data) so
    that every check runs before any weight is read, and tensors are read one at a time with plain
    file reads instead of a memory map whose pages would all stay resident.
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.file_of: dict[str, Path] = {}
        self.ranges: dict[str, tuple[int, int]] = {}  # absolute byte offsets in file_of[key]
        for f in files:
            for key, (dtype, shape, begin, end) in _parse_safetensors_header(f).items():
                if key in self.file_of:
                    raise ValueError(f"{f}: tensor {key} is also in {self.file_of[key]}; remove the duplicate file")
                self.shapes[key], self.dtypes[key], self.file_of[key] = shape, dtype, f
                self.ranges[key] = (begin, end)

    def read(self, fh, key: str) -> torch.Tensor:
        """Read one tensor from the open file ``fh`` (its ``file_of``) into fresh memory."""
        begin, end = self.ranges[key]
        buf = bytearray(end - begin)
        fh.seek(begin)
        if fh.readinto(buf) != len(buf):
            raise ValueError(f"{self.file_of[key]}: could not read tensor {key}: the file is truncated")
        dtype = _SAFETENSORS_DTYPES[self.dtypes[key]]
        if not buf:
            return torch.empty(self.shapes[key], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(self.shapes[key])


def _parse_safetensors_header(f: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """{key: (dtype, shape, begin, end)} of a safetensors file; raises ValueError naming the file."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("the header length is past the end of the file")
            header = json.loads(fh.read(n))
        entries = {}
        for key, v in header.items():
            if key == "__metadata__":
                continue
            begin, end = v["data_offsets"]
            if v["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {key} has dtype {v['dtype']}, which no EasyAnimate model uses")
            entries[key] = (v["dtype"], tuple(v["shape"]), 8 + n + begin, 8 + n + end)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{f}: not a readable safetensors file ({e}). It may be corrupt or not a safetensors file: "
            "download it again."
        ) from e
    data_end = max((end for *_, end in entries.values()), default=8 + n)
    if size < data_end:
        raise ValueError(
            f"{f}: truncated: its header describes {data_end} bytes but the file has {size}. Download it again."
        )
    return entries


def check_safetensors(path: str | Path) -> None:
    """Raise ValueError naming the file, what is wrong and the fix unless ``path`` is a complete safetensors file
    (header and data size only: no weight is read)."""
    _parse_safetensors_header(Path(path))


def _refuse_pickle(path: Path, hint: str = "") -> None:
    raise ValueError(
        f"{path}: refusing to load a pickle-based checkpoint ({path.suffix}): unpickling can run arbitrary "
        "code. Use the .safetensors release of this model, or convert it once in a trusted environment "
        f"with safetensors.torch.save_file.{hint}"
    )


def _pickle_hint(folder: Path) -> str:
    """The conversion command for a V1-V3 transformer folder (its releases' loader also read a .bin)."""
    config_file = folder / "config.json"
    if not config_file.is_file() or json.loads(config_file.read_text()).get("norm_type") != "ada_norm_single":
        return ""
    return (
        " This is an EasyAnimate V1-V3 (PixArt-motion) transformer folder, whose official loader "
        "(Transformer3DModel.from_pretrained_2d) falls back to diffusion_pytorch_model.bin; convert it once with "
        'python -c "import torch; from safetensors.torch import save_file; '
        "sd = torch.load('diffusion_pytorch_model.bin', map_location='cpu', weights_only=True); "
        "save_file({k: v.contiguous() for k, v in sd.items()}, 'diffusion_pytorch_model.safetensors')\" "
        f"run in {folder}."
    )


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding one model in a folder (sharded or not)."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        return sorted({folder / name for name in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    ggufs = sorted(folder.glob("*.gguf"))
    if not files and len(ggufs) == 1:  # a GGUF transformer in a model folder's transformer/
        return ggufs
    if not files:
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            _refuse_pickle(pickles[0], _pickle_hint(folder))
        raise ValueError(f"{folder}: no .safetensors weights found in this folder")
    return files


def resolve_files(path: str | Path, subfolder: str) -> tuple[list[Path], dict]:
    """Weight files and config dict for the model in ``subfolder`` ("transformer" or "vae") of ``path``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if path.suffix == ".gguf" and subfolder != "transformer":
            raise ValueError(f"{path}: a .gguf file holds a transformer here; give the VAE as .safetensors")
        if path.suffix not in (".safetensors", ".gguf"):
            raise ValueError(f"{path}: expected a .safetensors file (or a transformer .gguf)")
        config = {}
        for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
            if candidate.is_file():
                config = json.loads(candidate.read_text())
                break
        return [path], config
    folder = path / subfolder if (path / subfolder).is_dir() else path
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return _weight_files(folder), config


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------


def _describe_unknown(shapes: dict[str, tuple], files: list[Path], wanted: str) -> str:
    keys = sorted(shapes)
    hint = ""
    if any(k.startswith(("lora_unet_", "lora_te")) or "lora_A" in k or "lora_down" in k for k in keys):
        hint = " It looks like a LoRA: load it with a LoRA loader on top of a base model."
    elif any(k.startswith(("encoder.", "decoder.")) for k in keys) and wanted == "transformer":
        hint = " It looks like a VAE: load it with the VAE loader."
    elif any(k.startswith(("transformer_blocks.", "blocks.")) for k in keys) and wanted == "VAE":
        hint = " It looks like a transformer: load it with the transformer loader."
    elif any(
        k.startswith(("model.layers.", "encoder.block.", "embeddings.word_embeddings", "text_model.")) for k in keys
    ):
        hint = " It looks like a text encoder."
    return (
        f"{', '.join(map(str, files))}: these {len(keys)} tensors match no known EasyAnimate {wanted} "
        f"(found e.g. {', '.join(keys[:4])}).{hint}"
    )


def _block_indices(shapes: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


V3_FAMILY = ("V1", "V2", "V3")  # the PixArt-motion releases: one model class, three configurations

# Top-level tensor names only one transformer family has (shared ones, e.g. proj_out, clip_projection, say nothing).
_FAMILY_MARKERS = {
    "V1-V3": ("adaln_single.", "caption_projection.", "long_connect_fc.", "transformer_blocks.*.attn_temporal."),
    "V4": ("text_embedding_padding", "blocks.", "time_extra_emb.", "text_embedder."),
    "V5 / V5.1": ("proj.weight", "proj.bias", "text_proj", "time_embedding.", "norm_final."),
}


def _family_evidence(shapes: dict[str, tuple]) -> dict[str, str]:
    """{family: one tensor name only that family has} for every transformer family the tensors show."""
    found = {}
    for key in shapes:
        generic = re.sub(r"^transformer_blocks\.\d+\.", "transformer_blocks.*.", key)
        for family, markers in _FAMILY_MARKERS.items():
            if family not in found and generic.startswith(markers):
                found[family] = key
    return found


def detect_transformer(shapes: dict[str, tuple], files: list[Path], config: dict) -> CheckpointInfo:
    """Version, variant, size and config of a transformer from its (official-layout) tensor shapes."""
    evidence = _family_evidence(shapes)
    if len(evidence) > 1:
        raise ValueError(
            f"{', '.join(map(str, files))}: mixes tensors of different EasyAnimate transformers ("
            + "; ".join(f"{family}: e.g. {key}" for family, key in evidence.items())
            + "). Keep one model's files in a folder (a stray file from another version?)"
        )
    if "V1-V3" in evidence:
        return detect_transformer_v3(shapes, files, config)
    if "text_embedding_padding" in shapes or any(k.startswith("blocks.") for k in shapes):
        return detect_transformer_v4(shapes, files, config)
    needed = (
        "proj.weight",
        "proj_out.weight",
        "time_embedding.linear_1.weight",
        "transformer_blocks.0.norm1.linear.weight",
    )
    if not all(k in shapes for k in needed):
        raise ValueError(_describe_unknown(shapes, files, "transformer"))
    blocks = _block_indices(shapes, r"transformer_blocks\.(\d+)\.")
    dual = _block_indices(shapes, r"transformer_blocks\.(\d+)\.attn2\.")
    num_layers = len(blocks)
    if blocks != list(range(num_layers)) or dual != list(range(len(dual))):
        raise ValueError(f"{files[0]}: transformer blocks are not numbered 0..N-1 with dual-stream blocks first")
    inner, in_channels, p, _ = shapes["proj.weight"]
    head_dim = shapes["transformer_blocks.0.attn1.norm_q.weight"][0]
    if "text_proj.0.weight" in shapes:
        add_norm, text_dim = True, shapes["text_proj.1.weight"][1]
    elif "text_proj.weight" in shapes:
        add_norm, text_dim = False, shapes["text_proj.weight"][1]
    else:
        raise ValueError(_describe_unknown(shapes, files, "transformer"))
    t5_key = "text_proj_t5.1.weight" if add_norm else "text_proj_t5.weight"
    detected = {
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": shapes["proj_out.weight"][0] // (p * p),
        "patch_size": p,
        "num_layers": num_layers,
        "mmdit_layers": len(dual),
        "time_embed_dim": shapes["time_embedding.linear_1.weight"][0],
        "text_embed_dim": text_dim,
        "text_embed_dim_t5": shapes[t5_key][1] if t5_key in shapes else None,
        "add_norm_text_encoder": add_norm,
        "after_norm": "transformer_blocks.0.norm3.weight" in shapes,
        "norm_elementwise_affine": "norm_final.weight" in shapes,
    }
    notes = []
    for k, v in detected.items():
        if k in config and config[k] is not None and config[k] != v and k != "mmdit_layers":
            notes.append(f"config.json says {k}={config[k]!r} but the tensors say {v!r}; using the tensors")
    cfg = TransformerConfig.from_dict({**config, **detected})
    version = "V5.1" if add_norm else "V5"
    variant = {c: name for name, c in VARIANT_IN_CHANNELS[version].items()}.get(in_channels, "custom")
    num_params = sum(_numel(s) for s in shapes.values())
    size = {(48, 48, 3072): "12B", (36, 18, 3072): "7B"}.get((num_layers, len(dual), inner), f"{num_params / 1e9:.2f}B")
    return CheckpointInfo("transformer", version, variant, size, "official", "", num_params, files, cfg, notes)


# The official V4 predict scripts apply these yaml settings over the checkpoint's config.json (spec §1.1).
_V4_YAML_OVERRIDES = {"basic_block_type": "basic", "after_norm": False, "time_position_encoding": True}


def _check_complete(where, family: str, shapes: dict[str, tuple], needed: tuple[str, ...], block_pattern: str) -> int:
    """The number of blocks of a ``family`` transformer; raise when it lacks a ``needed`` tensor or a block."""
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise ValueError(
            f"{where}: looks like an EasyAnimate {family} transformer but lacks {absent[:3]}; "
            "the file may be incomplete (a shard missing?)"
        )
    blocks = _block_indices(shapes, block_pattern)
    if blocks != list(range(len(blocks))):
        raise ValueError(f"{where}: {family} transformer blocks are not numbered 0..N-1 (a shard missing?)")
    return len(blocks)


def detect_transformer_v4(shapes: dict[str, tuple], files: list[Path], config: dict) -> CheckpointInfo:
    """Config of a V4 (HunyuanDiT-based) transformer from its tensor shapes; config.json adds learn_sigma."""
    needed = (
        "text_embedding_padding",
        "pos_embed.proj.weight",
        "proj_out.weight",
        "text_embedder.linear_1.weight",
        "time_extra_emb.pooler.positional_embedding",
        "time_extra_emb.pooler.c_proj.weight",
        "blocks.0.attn1.norm_q.weight",
        "blocks.0.attn2.to_k.weight",
        "blocks.0.ff.net.0.proj.weight",
    )
    num_blocks = _check_complete(files[0], "V4 (HunyuanDiT-based)", shapes, needed, r"blocks\.(\d+)\.")
    inner, in_channels, p, _ = shapes["pos_embed.proj.weight"]
    head_dim = shapes["blocks.0.attn1.norm_q.weight"][0]
    text_len_t5 = shapes["time_extra_emb.pooler.positional_embedding"][0] - 1
    has_clip = "clip_padding" in shapes
    detected = {
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": shapes["proj_out.weight"][0] // (p * p),
        "patch_size": p,
        "num_layers": num_blocks,
        "ff_inner_dim": shapes["blocks.0.ff.net.0.proj.weight"][0],
        "cross_attention_dim": shapes["blocks.0.attn2.to_k.weight"][1],
        "cross_attention_dim_t5": shapes["text_embedder.linear_1.weight"][1],
        "pooled_projection_dim": shapes["time_extra_emb.pooler.c_proj.weight"][0],
        "text_len": shapes["text_embedding_padding"][0] - text_len_t5,
        "text_len_t5": text_len_t5,
        "after_norm": "blocks.0.norm4.weight" in shapes,
        "enable_clip_in_inpaint": has_clip,
    }
    if has_clip:
        detected["n_query"] = shapes["clip_padding"][0]
        kv = shapes.get("clip_projection.kv_proj.weight")
        detected["projection_dim"] = kv[1] if kv else detected["cross_attention_dim"]
    notes = []
    for k, v in detected.items():
        if (
            config.get(k) is not None
            and config[k] != v
            and k in {f.name for f in dataclasses.fields(TransformerV4Config)}
        ):
            notes.append(f"config.json says {k}={config[k]!r} but the tensors say {v!r}; using the tensors")
    if "blocks.0.t_embed.pe" not in shapes:
        notes.append("the temporal position table (blocks.N.t_embed.pe) is not stored; it is computed")
    cfg = TransformerV4Config.from_dict({**config, **_V4_YAML_OVERRIDES, **detected})
    if cfg.num_layers % 2:
        raise ValueError(f"{files[0]}: {cfg.num_layers} V4 blocks; the long skips need an even number")
    if has_clip != cfg.has_clip:
        raise ValueError(
            f"{files[0]}: the CLIP image branch is {'present' if has_clip else 'absent'} but in_channels "
            f"{in_channels} / out_channels {cfg.out_channels} (learn_sigma {cfg.learn_sigma}) say otherwise"
        )
    latent = cfg.latent_channels
    variant = {latent: "T2V", 3 * latent: "InP"}.get(in_channels, "custom")
    num_params = sum(_numel(s) for k, s in shapes.items() if not k.endswith(".t_embed.pe"))
    size = "XL" if (inner, num_blocks) == (1408, 40) else f"{num_params / 1e9:.2f}B"
    return CheckpointInfo("transformer", "V4", variant, size, "official", "", num_params, files, cfg, notes)


# What tensors cannot show of a V1-V3 model, which a config.json may add (the motion layout needs the yaml keys).
_V3_MOTION_KEYS = ("basic_block_type", "motion_module_type", "motion_module_kwargs", "motion_module_kwargs_even")
_V3_FROM_CONFIG = ("norm_eps",)
_V3_RESOLUTION_KEY = "adaln_single.emb.resolution_embedder.linear_1.weight"


def detect_transformer_v3(shapes: dict[str, tuple], files: list[Path], config: dict) -> CheckpointInfo:
    """Version (V1 / V2 / V3), variant and config of a PixArt-motion transformer from its tensor shapes.

    The release table decides what shapes cannot show (12 input channels: V3 InP; 4 with U-ViT long skips: V2;
    4 without: V1); a config.json carrying the release yaml's motion keys overrides it.
    """
    where = ", ".join(map(str, files))
    has_motion = any(".attn_temporal." in k for k in shapes)
    has_base = "pos_embed.proj.weight" in shapes and "adaln_single.linear.weight" in shapes
    if has_motion and not has_base:
        raise ValueError(
            f"{where}: holds only motion-module weights (like easyanimate_v1_mm.safetensors), which go on top of "
            "the PixArt-XL-2 base transformer: make a V1 model folder of both once with easyanimate assemble-v1 "
            "--base <PixArt-XL-2-512x512 folder> --motion-module <this file> --out <new folder>, and load that"
        )
    if not has_motion:
        raise ValueError(
            f"{where}: a PixArt-alpha image transformer without motion modules (no transformer_blocks.N."
            "attn_temporal tensors), not an EasyAnimate video transformer"
        )
    needed = (
        "scale_shift_table",
        "proj_out.weight",
        "caption_projection.linear_1.weight",
        "adaln_single.linear.weight",
    )
    _check_complete(where, "V1-V3", shapes, needed, r"transformer_blocks\.(\d+)\.")
    motion_config = config if any(k in config for k in _V3_MOTION_KEYS) else None
    try:
        cfg = config_from_state_dict(shapes, motion_config)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    notes = []
    for k in ("in_channels", "out_channels", "num_layers", "patch_size", "caption_channels"):
        if config.get(k) is not None and config[k] != getattr(cfg, k):
            notes.append(
                f"config.json says {k}={config[k]!r} but the tensors say {getattr(cfg, k)!r}; using the tensors"
            )
    changes = {k: config[k] for k in _V3_FROM_CONFIG if config.get(k) is not None}
    width, head_dim = shapes["pos_embed.proj.weight"][0], config.get("attention_head_dim")
    if motion_config is None and head_dim and width % head_dim == 0:
        changes.update(attention_head_dim=head_dim, num_attention_heads=width // head_dim)
    if config.get("sample_size") is not None:
        # sample_size 128 adds the resolution embeddings: only a value the tensors agree with is taken.
        if (config["sample_size"] == 128) == (_V3_RESOLUTION_KEY in shapes):
            changes["sample_size"] = config["sample_size"]
        else:
            notes.append(f"config.json says sample_size={config['sample_size']!r}, which the tensors contradict")
    cfg = cfg.replace(**changes)
    if cfg.inner_dim != width:  # heads are invisible in shapes: only the release head size (72) is assumed
        raise ValueError(
            f"{where}: width {width} is not a whole number of {cfg.attention_head_dim}-wide heads; put the model's "
            "config.json (with attention_head_dim) beside the file"
        )
    version = cfg.release
    if motion_config is None:
        notes.append(
            f"motion-module heads and attention kinds are not in the tensors: using the {version} release's "
            "(config.json with the release yaml's transformer_additional_kwargs overrides them)"
        )
    if not any(k.endswith(".pos_encoder.pe") for k in shapes):
        # The releases store them (a persistent buffer): a file without them was trained without them.
        notes.append("no frame-position tables (pos_encoder.pe) stored: motion modules without temporal positions")
    latent = cfg.latent_channels
    variant = {latent: "T2V", 3 * latent: "InP"}.get(cfg.in_channels, "custom")
    num_params = sum(_numel(s) for k, s in shapes.items() if not k.endswith(".pos_encoder.pe"))
    size = "XL" if (cfg.inner_dim, cfg.num_layers) == (1152, 28) else f"{num_params / 1e9:.2f}B"
    return CheckpointInfo("transformer", version, variant, size, "official", "", num_params, files, cfg, notes)


_IMAGE_VAE_PROBE = "encoder.down_blocks.0.resnets.0.conv1.weight"


def is_image_vae(shapes: dict[str, tuple]) -> bool:
    """Whether the tensors are a 2-D (image) AutoencoderKL: 4-D conv weights under diffusers' ``resnets`` names."""
    return len(shapes.get(_IMAGE_VAE_PROBE, ())) == 4


def detect_image_vae(shapes: dict[str, tuple], files: list[Path], config: dict) -> CheckpointInfo:
    """V1's image VAE (an SD AutoencoderKL) from tensor shapes; a config.json sets scaling factor, norm groups."""
    where = ", ".join(map(str, files))
    needed = ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight")
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise ValueError(
            f"{where}: a 2-D AutoencoderKL without {absent}; EasyAnimate V1 uses the SD VAE, which has them "
            "(SD3 / Flux VAEs are not supported)"
        )
    downs = _block_indices(shapes, r"encoder\.down_blocks\.(\d+)\.")
    block_out = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in downs)
    cfg = ImageVAEConfig.from_dict(
        {
            **config,
            "block_out_channels": block_out,
            "layers_per_block": len(_block_indices(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
            "latent_channels": shapes["post_quant_conv.weight"][0],
            "in_channels": shapes["encoder.conv_in.weight"][1],
            "out_channels": shapes["decoder.conv_out.weight"][0],
            "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes,
        }
    )
    num_params = sum(_numel(s) for s in shapes.values())
    notes = [] if config else [f"no config.json found; using the SD VAE settings (scaling {cfg.scaling_factor})"]
    return CheckpointInfo(
        "vae", "V1", "image", f"{num_params / 1e6:.0f}M", "diffusers", "", num_params, files, cfg, notes
    )


def _vae_training_loss_tensors() -> dict[str, tuple[int, ...]]:
    """{name: shape} of the trainer's loss module that the released V2 and V3 VAE files still carry.

    The official VAE trainer (easyanimate/vae/ldm/models/omnigen_casual3dcnn.py) keeps ``LPIPSWithDiscriminator``
    as ``self.loss``; the released files were saved from it, and the official ``from_pretrained`` loads them
    with strict=False (its log shows these 96 "unexpected keys"). Listed here so exactly these are skipped:
    taming's LPIPS (VGG16 features, 5 linear heads, input scaling), taming's 3-layer PatchGAN
    ``NLayerDiscriminator`` (BatchNorm) and the official ``Discriminator3D`` (64, 128, 256); about 21 M values,
    the files' 8 % over the VAE graph. tests/data/official_v2v3_vae_keys.tsv.gz holds the official module's.
    """
    t: dict[str, tuple[int, ...]] = {"loss.logvar": ()}
    lp = "loss.perceptual_loss."
    t[lp + "scaling_layer.shift"] = t[lp + "scaling_layer.scale"] = (1, 3, 1, 1)
    vgg = {1: [(0, 3, 64), (2, 64, 64)], 2: [(5, 64, 128), (7, 128, 128)], 3: [(10, 128, 256), (12, 256, 256)]}
    vgg[3].append((14, 256, 256))
    vgg[4] = [(17, 256, 512), (19, 512, 512), (21, 512, 512)]
    vgg[5] = [(24, 512, 512), (26, 512, 512), (28, 512, 512)]
    for part, convs in vgg.items():  # the torchvision layer index of each conv in its LPIPS slice
        for index, cin, cout in convs:
            t[f"{lp}net.slice{part}.{index}.weight"], t[f"{lp}net.slice{part}.{index}.bias"] = (
                (cout, cin, 3, 3),
                (cout,),
            )
    for i, c in enumerate((64, 128, 256, 512, 512)):
        t[f"{lp}lin{i}.model.1.weight"] = (1, c, 1, 1)
    d = "loss.discriminator.main."
    t[d + "0.weight"], t[d + "0.bias"] = (64, 3, 4, 4), (64,)
    for conv, cin, cout in ((2, 64, 128), (5, 128, 256), (8, 256, 512)):  # bias-free conv, then BatchNorm
        t[f"{d}{conv}.weight"] = (cout, cin, 4, 4)
        for name in ("weight", "bias", "running_mean", "running_var"):
            t[f"{d}{conv + 1}.{name}"] = (cout,)
        t[f"{d}{conv + 1}.num_batches_tracked"] = ()
    t[d + "11.weight"], t[d + "11.bias"] = (1, 512, 4, 4), (1,)
    d3 = "loss.discriminator3d."
    t[d3 + "conv_in.weight"], t[d3 + "conv_in.bias"] = (64, 3, 3, 3, 3), (64,)
    for i, (cin, cout) in enumerate(((64, 64), (64, 128), (128, 256))):
        b = f"{d3}blocks.{i}."
        for norm, c in (("norm1", cin), ("norm2", cout)):
            t[b + norm + ".weight"] = t[b + norm + ".bias"] = (c,)
        t[b + "conv1.weight"], t[b + "conv1.bias"] = (cout, cin, 3, 3, 3), (cout,)
        t[b + "conv2.weight"], t[b + "conv2.bias"] = (cout, cout, 3, 3, 3), (cout,)
        if i < 2:  # blur-pool downsampling blocks: fixed filters in the main path and the shortcut
            t[b + "downsampler.filt"], t[b + "shortcut.0.filt"] = (cout, 1, 3, 3, 3), (cin, 1, 3, 3, 3)
            t[b + "shortcut.1.weight"], t[b + "shortcut.1.bias"] = (cout, cin, 1, 1, 1), (cout,)
        else:
            t[b + "shortcut.0.weight"], t[b + "shortcut.0.bias"] = (cout, cin, 1, 1, 1), (cout,)
    t[d3 + "conv_norm_out.weight"] = t[d3 + "conv_norm_out.bias"] = (256,)
    t[d3 + "conv_out.weight"], t[d3 + "conv_out.bias"] = (1, 256, 3, 3, 3), (1,)
    return t


VAE_TRAINING_LOSS_TENSORS = _vae_training_loss_tensors()


def _vae_temporal_mode(config: dict) -> str | None:
    """The chunking a config.json's flags name (None: it names none), via VAEConfig.from_dict's reading."""
    flags = ("cache_mag_vae", "cache_compression_vae", "slice_compression_vae", "slice_mag_vae")
    if not any(k in config for k in flags):
        return None
    return VAEConfig.from_dict(
        {**dataclasses.asdict(VAE_V4), **{k: config[k] for k in flags if k in config}}
    ).temporal_mode


def detect_vae(shapes: dict[str, tuple], files: list[Path], config: dict) -> CheckpointInfo:
    """Version and config of a MagViT VAE from its tensor shapes (a config.json adds norm groups, scaling).

    V2 and V3 VAEs have V4's graph; their released files also carry the trainer's loss tensors (listed in
    VAE_TRAINING_LOSS_TENSORS), which mark them. V2 and V3 share every tensor: config.json's
    slice_compression_vae tells them apart (a file without config.json is taken as V3, the later release).
    """
    if is_image_vae(shapes):
        return detect_image_vae(shapes, files, config)
    if not all(k in shapes for k in ("post_quant_conv.weight", "quant_conv.weight", "encoder.conv_in.weight")):
        raise ValueError(_describe_unknown(shapes, files, "VAE"))
    extra = sorted(k for k in shapes if k.startswith("loss."))
    wrong = [k for k in extra if VAE_TRAINING_LOSS_TENSORS.get(k, "absent") != shapes[k]]
    if wrong:
        raise ValueError(
            f"{files[0]}: {len(wrong)} loss.* tensor(s) that the released V2/V3 trainer's loss module does not have "
            f"(e.g. {wrong[0]} {list(shapes[wrong[0]])}); remove them or save the VAE without its training loss"
        )
    shapes = {k: v for k, v in shapes.items() if not k.startswith("loss.")}
    latent = shapes["post_quant_conv.weight"][0]
    downs = _block_indices(shapes, r"encoder\.down_blocks\.(\d+)\.")
    block_out = [shapes[f"encoder.down_blocks.{i}.convs.0.conv1.weight"][0] for i in downs]
    layers = len(_block_indices(shapes, r"encoder\.down_blocks\.0\.convs\.(\d+)\."))
    has_attention = "encoder.mid_block.attentions.0.to_q.weight" in shapes
    named_mode = _vae_temporal_mode(config)
    if extra and named_mode in ("mag", "slice"):
        raise ValueError(
            f"{files[0]}: the tensors are a V2/V3 VAE's (they carry its trainer's loss.* tensors) but config.json "
            f"names the {named_mode} chunking of V4-V5.1; use the config.json of the release the weights come from"
        )
    # The released settings for these tensors, overridden by whatever the config.json states.
    if latent != 4:
        preset = VAE_V5 if has_attention else VAE_V51
    elif named_mode == "v2-magvit":
        preset = VAE_V2
    elif extra or named_mode == "v3-slice":
        preset = VAE_V3
    else:
        preset = VAE_V4
    base = VAEConfig.from_dict({**dataclasses.asdict(preset), **config})
    cfg = dataclasses.replace(
        base,
        latent_channels=latent,
        block_out_channels=tuple(block_out),
        layers_per_block=layers,
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        mid_block_attention=(base.mid_block_attention or preset.mid_block_attention or "spatial")
        if has_attention
        else None,
    )
    version = {"slice": "V4", "v2-magvit": "V2", "v3-slice": "V3"}.get(cfg.temporal_mode)
    version = version or ("V5" if has_attention else "V5.1")
    if any(c % cfg.norm_num_groups for c in block_out):
        raise ValueError(
            f"{files[0]}: GroupNorm with {cfg.norm_num_groups} groups cannot normalise {block_out} channels; "
            "this is not a released VAE geometry, so put its config.json (with norm_num_groups) beside the file"
        )
    num_params = sum(_numel(s) for s in shapes.values())
    notes = [] if config else [f"no config.json found; using the released {version} VAE settings"]
    if version == "V3" and not config:
        notes.append("V2 and V3 VAEs have the same tensors: put the release's vae/config.json beside it for V2")
    if extra:
        notes.append(f"{len(extra)} training-loss tensors (loss.*) in the file are not used")
    info = CheckpointInfo(
        "vae", version, cfg.temporal_mode, f"{num_params / 1e6:.0f}M", "official", "", num_params, files, cfg, notes
    )
    info.ignored = extra
    return info


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _read_header(path, subfolder: str) -> tuple[_Header, dict, dict[str, str], str]:
    """Header, config and the map official key -> file key, plus the file layout."""
    files, config = resolve_files(path, subfolder)
    if files[0].suffix == ".gguf":
        from .quant.gguf_file import GGUFHeader

        header = GGUFHeader(files[0])
        config = {**header.config, **config}
    else:
        header = _Header(files)
    prefix = strip_wrapper_prefix(header.shapes)
    file_keys = [k for k in header.shapes]
    layout = "diffusers" if is_diffusers_layout(file_keys) else "official"
    to_file = {}
    for k in file_keys:
        official = diffusers_to_official(k[len(prefix) :]) if subfolder == "transformer" else k[len(prefix) :]
        if subfolder == "vae":
            official = canonical_key(official)  # old diffusers attention names (query, proj_attn) of image VAEs
            if official in to_file:
                raise ValueError(f"{k} and {to_file[official]} are one tensor under its old and new name; keep one")
        to_file[official] = k
    return header, config, to_file, layout


_DETECTORS = {"transformer": detect_transformer, "vae": detect_vae}


def _inspect(path, kind: str) -> tuple[_Header, dict[str, str], CheckpointInfo]:
    """Header, official-key -> file-key map and detected description of the ``kind`` model at ``path``."""
    header, config, to_file, layout = _read_header(path, kind)
    shapes = {official: header.shapes[fk] for official, fk in to_file.items()}
    info = _DETECTORS[kind](shapes, header.files, config)
    if info.layout != "diffusers":  # a detector that knows its layout (the image VAE's) keeps it
        info.layout = layout
    info.stored_dtype = ", ".join(sorted(set(header.dtypes.values())))
    probe_key = {
        "transformer": "pos_embed.proj.weight" if info.version in ("V4", *V3_FAMILY) else "proj.weight",
        "vae": "post_quant_conv.weight",
    }
    probe = to_file[probe_key[kind]]
    info.weight_dtype = _SAFETENSORS_DTYPES.get(header.dtypes[probe], torch.float32)
    return header, to_file, info


def inspect_checkpoint(path, kind: str | None = None) -> CheckpointInfo:
    """Describe the transformer or VAE at ``path`` from its headers alone; ``kind`` None tries both."""
    errors = []
    for k in [kind] if kind else ["transformer", "vae"]:
        try:
            return _inspect(path, k)[2]
        except ValueError as e:
            errors.append(str(e))
    raise ValueError("\n".join(errors))


def _check_keys(
    model: nn.Module, shapes: dict[str, tuple], to_file: dict[str, str], header: _Header, ignored=()
) -> None:
    """Raise, naming key and file, unless the checkpoint has exactly the model's keys (plus ``ignored``) and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in set(expected) - set(shapes) if _derived(model, k) is None)
    unexpected = sorted(set(shapes) - set(expected) - set(ignored))
    where = ", ".join(map(str, header.files))
    if missing:
        raise ValueError(
            f"{where}: missing {len(missing)} tensor(s) the detected model needs, e.g. {missing[:3]}. "
            "The file may be incomplete (a shard missing?) or a different model."
        )
    if unexpected:
        raise ValueError(
            f"{header.file_of[to_file[unexpected[0]]]}: {len(unexpected)} unexpected tensor(s), e.g. "
            f"{[to_file[k] for k in unexpected[:3]]}; they belong to no layer of the detected model."
        )
    for k, shape in expected.items():
        if k in shapes and shapes[k] != shape:
            raise ValueError(
                f"{header.file_of[to_file[k]]}: tensor {to_file[k]} has shape {list(shapes[k])}, "
                f"the detected model needs {list(shape)}"
            )


def _derived(model: nn.Module, key: str) -> torch.Tensor | None:
    """A deterministic tensor the model can compute itself (V4's temporal table), or None."""
    derive = getattr(model, "derived_tensor", None)
    return derive(key) if derive is not None else None


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the (meta) parameter or buffer named ``key``."""
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[name] = tensor


def _assign_quantized(model: nn.Module, key: str, raw: torch.Tensor, kind: str, shape: tuple[int, ...]) -> None:
    """A GGUF weight kept in its block format: the bytes as the parameter, the format on the layer."""
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    if name != "weight" or not hasattr(module, "quant_kind"):
        raise ValueError(f"{key} is stored as {kind}, but only Linear weights can stay quantized; store it as F32")
    module._parameters[name] = nn.Parameter(raw, requires_grad=False)
    module.quant_kind, module.quant_shape = kind, tuple(shape)


def _load_weights(
    build: Callable[[], nn.Module],
    header: _Header,
    to_file: dict[str, str],
    dtype: torch.dtype | None,
    device,
    progress: Callable[[int, int], None] | None,
    ignored=(),
) -> nn.Module:
    with torch.device("meta"):
        model = build()
    shapes = {official: header.shapes[fk] for official, fk in to_file.items()}
    _check_keys(model, shapes, to_file, header, ignored)
    keys = list(model.state_dict())
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        if k not in to_file:  # checked above: a tensor the model derives (a checkpoint may omit it)
            _assign(model, k, _derived(model, k).to(device=device, dtype=dtype))
            continue
        by_file.setdefault(header.file_of[to_file[k]], []).append(k)
    done = len(keys) - sum(len(v) for v in by_file.values())
    for f, file_keys in by_file.items():
        with open(f, "rb") as fh:
            for k in file_keys:
                t = header.read(fh, to_file[k])
                if getattr(header, "quantized", None) and header.quantized(to_file[k]):
                    _assign_quantized(model, k, t.to(device), header.dtypes[to_file[k]], shapes[k])
                else:
                    _assign(model, k, t.to(device=device, dtype=dtype or t.dtype))
                del t
                done += 1
                if progress:
                    progress(done, len(keys))
    return model.eval()


def _load(path, kind: str, build: Callable[[CheckpointInfo, torch.dtype], nn.Module], dtype, device, progress):
    """Detect, build on meta, check keys, then read and assign every tensor in the target dtype."""
    header, to_file, info = _inspect(path, kind)
    model_dtype = dtype or info.weight_dtype
    model = _load_weights(
        lambda: build(info, model_dtype), header, to_file, model_dtype, device, progress, info.ignored
    )
    model.info = info
    return model


def load_transformer(
    path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    operations=None,
    compat: str = "official",
    rope_in_first_block: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EasyAnimateTransformer3D | EasyAnimateV4Transformer3D | EasyAnimateV3Transformer3D:
    """Load a V1-V5.1 transformer; ``dtype`` None keeps the stored dtype. ``model.info`` says what it is.

    ``rope_in_first_block`` (V4 only): RoPE in block 0's self-attention, on in the V4-era code the weights were
    trained with (the default), off in the official code since V5.
    """

    def build(info: CheckpointInfo, model_dtype: torch.dtype):
        ops = operations
        if info.files[0].suffix == ".gguf":  # Linear weights stay in their blocks, dequantized per use
            from .quant.layers import gguf_operations

            ops = gguf_operations(operations or nn)
        if info.version == "V4":
            cfg = info.config.replace(compat=compat)
            if rope_in_first_block is not None:
                cfg = cfg.replace(rope_in_first_block=rope_in_first_block)
            return EasyAnimateV4Transformer3D(cfg, dtype=model_dtype, operations=ops)
        if rope_in_first_block is not None:
            raise ValueError(f"rope_in_first_block applies to V4 transformers; {path} is {info.version}")
        if info.version in V3_FAMILY:  # one official code path, no compat switch
            return EasyAnimateV3Transformer3D(info.config, dtype=model_dtype, operations=ops)
        return EasyAnimateTransformer3D(info.config.replace(compat=compat), dtype=model_dtype, operations=ops)

    return _load(path, "transformer", build, dtype, device, progress)


def load_vae(
    path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    operations=None,
    progress: Callable[[int, int], None] | None = None,
) -> MagvitVAE | ImageVAE:
    """Load a MagViT VAE (V2, V3, V4 slice, V5 / V5.1 mag) or V1's image VAE; ``dtype`` None keeps the stored one."""

    def build(info: CheckpointInfo, model_dtype: torch.dtype) -> MagvitVAE | ImageVAE:
        if info.variant == "image":
            return ImageVAE(info.config, dtype=model_dtype, operations=operations)
        return MagvitVAE(info.config, dtype=model_dtype, operations=operations)

    return _load(path, "vae", build, dtype, device, progress)
