"""qexport: quantized PyTorch models to ONNX and bit-packed binaries, with a verifier.

The Python API (`qexport.api`): `quantize`, `load`, `to_onnx`, `to_c`, `verify`, `load_data`, and
`analyze` (which layer hurts), `prepare` / `optimizer` / `convert` (quantization-aware training
in your own loop), and `Budget` (mixed precision under a size or accuracy budget, `qexport.mixed`); imported
on first use so that `qexport --help` stays fast.
"""
__version__ = "0.3.0"

__all__ = ["quantize", "analyze", "prepare", "optimizer", "convert", "load", "to_onnx", "to_c", "verify", "load_data", "Budget"]


def __getattr__(name: str):
    if name == "api":
        import importlib

        return importlib.import_module("qexport.api")
    if name in ("quantize", "analyze", "prepare", "optimizer", "convert", "load", "to_onnx", "to_c", "verify"):
        from qexport import api

        return getattr(api, name)
    if name == "Budget":
        from qexport.mixed import Budget

        return Budget
    if name == "load_data":
        from qadmm.data import load_dataset

        return load_dataset
    raise AttributeError(f"module 'qexport' has no attribute {name!r}")
