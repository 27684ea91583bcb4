"""qadmm: the quantization math of qexport (code sets, scale fitting, back-ends).

Nothing here imports the CLI or ONNX; `qexport` builds on this package, never the reverse.
"""
from qadmm.codes import CodeSet, Fit, dequantize, fit

__all__ = ["CodeSet", "Fit", "dequantize", "fit"]
