"""qexport: quantized PyTorch models to ONNX and bit-packed binaries, with a verifier.

The Python API (`qexport.api`): `quantize`, `load`, `to_onnx`, `to_c`, `verify`, `load_data`, and
`Config` and one constructor per back-end (`qexport.GPTQ(bits=4, per_channel=True)`, ...: a typed
request), `analyze` (which layer hurts), `prepare` / `optimizer` / `convert` (quantization-aware training
in your own loop), and `Budget` (mixed precision under a size or accuracy budget, `qexport.mixed`); imported
on first use so that `qexport --help` stays fast.
"""
__version__ = "0.3.0"

__all__ = ["quantize", "analyze", "prepare", "optimizer", "convert", "load", "to_onnx", "to_c", "verify", "load_data", "Budget", "Config"]


def __getattr__(name: str):
    if name == "api":
        import importlib

        return importlib.import_module("qexport.api")
    if name in ("quantize", "analyze", "prepare", "optimizer", "convert", "load", "to_onnx", "to_c", "verify"):
        from qexport import api

        return getattr(api, name)
    if name == "Config":
        from qexport.config import Config

        return Config
    if name[:1].isupper():  # qexport.GPTQ(bits=4, per_channel=True, damp=0.01): a typed request
        from qexport.config import CONSTRUCTORS, constructor

        if name in CONSTRUCTORS:
            return constructor(name)
    if name == "Budget":
        from qexport.mixed import Budget

        return Budget
    if name == "load_data":
        from qadmm.data import load_dataset

        return load_dataset
    raise AttributeError(f"module 'qexport' has no attribute {name!r}")
