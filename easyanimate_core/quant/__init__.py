"""Quantized transformer weights: GGUF files (``gguf_file``), their block formats in torch (``blocks``), and the
layer namespace that keeps them quantized and dequantizes each weight when its layer runs (``layers``)."""
