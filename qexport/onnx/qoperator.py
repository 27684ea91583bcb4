"""`--form qoperator`: integer compute with onnxruntime's QLinear operators.

input -> [(x - mean)/std] -> QuantizeLinear(uint8) -> QLinearConv / QGemm (int8 codes, zero point
0, scale α, or α·γ/σ per channel with a folded BatchNorm; int32 bias with scale x_s·w_s; a
following ReLU folded into the requantization by a zero point of 0) -> QLinearAdd for residuals
-> QLinearGlobalAveragePool -> ... -> DequantizeLinear -> output.

Linear layers use com.microsoft QGemm rather than QLinearMatMul: QGemm takes the int32 bias and
`transB`, so the codes keep the artifact's (out, in) layout and the bias needs no extra node.
Each op kind says whether it has an integer kernel (`qexport/ops/`); one without (a layer kept
float, a lone BatchNorm, a sigmoid, LayerNorm, ...) runs as a float island DequantizeLinear ->
float op -> QuantizeLinear.
"""
from __future__ import annotations

from qexport.ops.emit import qname
from qexport.onnx.integer_graph import computes_float, end_integer_graph, float_island, start_integer_graph
from qexport.ops import KINDS
from qexport.ops.base import Op


def export_qoperator(art, ops: list[Op], qp: dict, calib: dict, opset: int | None = None):
    ctx = start_integer_graph(art, ops, qp, opset)
    for op in ops:
        if computes_float(ctx, op) or not KINDS[op.kind].qoperator(ctx, op, [qname(i) for i in op.inputs], qname(op.out)):
            float_island(ctx, op)
    return end_integer_graph(ctx, art, "qoperator", calib)
