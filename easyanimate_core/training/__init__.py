"""Training: the transformer trainer (``easyanimate train``), the VAE trainer (``easyanimate train-vae``), dataset
preparation (``easyanimate prepare``) and what they stand on.

    trainer.py      the transformer's LoRA / full fine-tuning loop, its checks and its command-line options
    vae_trainer.py  the mag VAE's training / fine-tuning loop (chunked, resumable, DDP), checks and options
    vae_losses.py   its loss terms: reconstruction, KL, outlier penalty, discriminators, perceptual distance
    examples.py     prompt embeddings and latents computed before training, the examples of each step, inpaint masks
    dataset.py      the metadata JSON, checked and bucketed; loading a clip
    files.py        checkpoints, full-model shards, the loss log (safetensors and JSON, written atomically)
    runs.py         what every run shares: processes, stop signals, resume command, lr schedule, exit codes
    prepare/        raw videos -> the dataset JSON: scene split, filters, captions; resumable, local workers or Ray

Imports go one way: trainer / vae_trainer -> examples -> dataset / runs -> files.
"""
