"""The micro EasyAnimate model: procedural training data, its scorers, and the micro V5.1 configs.

    data      moving-shape videos with attribute captions ("a red circle moving right slowly on a black
              background"), held-out attribute combinations, the official dataset JSON (write_dataset)
    scoring   plain image analysis of generated frames: object colour, motion direction, objects per frame
    model     micro V5.1 VAE / transformer configs, a word-level Qwen2-VL text encoder, the initial checkpoint

Everything here is plain numpy / OpenCV / PyTorch and runs offline on a CPU.
"""
