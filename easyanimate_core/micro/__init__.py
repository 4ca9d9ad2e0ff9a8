"""The micro EasyAnimate model: procedural training data, its scorers, and the micro V5.1 configs.

    data      moving-shape videos with attribute captions ("a red circle moving right slowly on a black
              background"), held-out attribute combinations, the official dataset JSON (write_dataset)
    scoring   plain image analysis of generated frames: object colour, motion direction, objects per frame
    model     micro V5.1 VAE / transformer configs, a word-level Qwen2-VL text encoder, the initial checkpoint

Everything here is plain numpy / OpenCV / PyTorch and runs offline on a CPU.

    MICRO_MODEL (the shipped model folder: easyanimate_core/micro_model/) and shipped_micro_model()
"""

from pathlib import Path

MICRO_MODEL = Path(__file__).resolve().parents[1] / "micro_model"
# Generation settings a model folder may carry (read by the CLI when the flags are not given).
DEFAULTS_FILE = "generation_defaults.json"


def shipped_micro_model() -> Path | None:
    """The shipped micro model folder when its weights are present in this install, else None."""
    weights = MICRO_MODEL / "transformer" / "diffusion_pytorch_model.safetensors"
    return MICRO_MODEL if weights.is_file() else None
