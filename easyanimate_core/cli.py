"""The `easyanimate` command line.

easyanimate info PATH    what a checkpoint is (version, variant, size, dtype, missing parts)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .loading import inspect_checkpoint

# Parts a full model folder carries beside the transformer and the VAE, per version.
_PIPELINE_PARTS = {
    "V5.1": ["text_encoder", "tokenizer"],
    "V5": ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"],
}


def info(path: str) -> int:
    """Print what the checkpoint at ``path`` is; a model root gets each part and what is missing."""
    root = Path(path).expanduser()
    if root.is_dir() and ((root / "transformer").is_dir() or (root / "vae").is_dir()):
        version = None
        for part in ("transformer", "vae"):
            if not (root / part).is_dir():
                print(f"{part}: missing ({root / part})")
                continue
            part_info = inspect_checkpoint(root / part, kind=part)
            version = version or part_info.version
            print(part_info.summary())
        for part in _PIPELINE_PARTS.get(version, []):
            print(f"{part}: {'present' if (root / part).is_dir() else 'missing'}")
        return 0
    print(inspect_checkpoint(root).summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="easyanimate", description="EasyAnimate video models on plain PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    p_info = commands.add_parser("info", help="describe a checkpoint (folder or .safetensors file)")
    p_info.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return info(args.path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
