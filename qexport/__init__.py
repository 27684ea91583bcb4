"""qexport: quantized PyTorch models to ONNX and bit-packed binaries, with a verifier."""
__version__ = "0.1.0"
