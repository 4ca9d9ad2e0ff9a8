"""Training: the transformer trainer (``easyanimate train``) and what it stands on.

    trainer.py    the transformer's LoRA / full fine-tuning loop, its checks and its command-line options
    examples.py   prompt embeddings and latents computed before training, the examples of each step, inpaint masks
    dataset.py    the metadata JSON, checked and bucketed; loading a clip
    files.py      checkpoints, full-model shards, the loss log (safetensors and JSON, written atomically)
    runs.py       what every run shares: its processes, the signals that stop it, the resume command

Imports go one way: trainer -> examples -> dataset / runs -> files.
"""
