"""The three ONNX forms, defined once: what each is, what it needs, and what `verify` judges it against.

- `weights`: integer codes in the file (INT2/INT4/INT8/INT16), float compute; judged against the float
  reference of the artifact (fp32, within what fp32's own summation order costs).
- `qdq`: QuantizeLinear/DequantizeLinear pairs around float operators; onnxruntime fuses them into its
  integer kernels when graph optimisations are on, and with them off computes float ops on dequantized
  values, which meet the integer kernels' results only up to a rounding tie per layer: judged layer by
  layer then.
- `qoperator`: onnxruntime's QLinear* operators, integer kernels always; judged end to end against the
  integer reference (`qexport.ops.integer`).
The integer forms need calibration data (activation ranges) and int8 codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qadmm.errors import UserError
from qexport.onnx.qdq import export_qdq
from qexport.onnx.qoperator import export_qoperator
from qexport.onnx.weights import export_weights


@dataclass(frozen=True)
class Form:
    name: str
    integer: bool  # uint8 activations: calibration data and int8 codes needed; the integer reference judges it
    export: Callable  # weights: (art, ops, opset, dequant); integer: (art, ops, qparams, calibration, opset)
    always_integer_kernels: bool  # onnxruntime runs its integer kernels whatever the session's optimisation level
    summary: str


FORMS: dict[str, Form] = {f.name: f for f in (
    Form("weights", False, export_weights, False, "integer weights, float compute"),
    Form("qdq", True, export_qdq, False, "Quantize/DequantizeLinear around float ops (fused by onnxruntime)"),
    Form("qoperator", True, export_qoperator, True, "onnxruntime's QLinear operators"),
)}
NAMES = tuple(FORMS)


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise UserError(f"unknown form {name!r}: use one of {', '.join(FORMS)}")
    return FORMS[name]
