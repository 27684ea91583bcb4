"""`--form qdq`: the same quantization as `qoperator`, written as QuantizeLinear/DequantizeLinear
pairs around float operators (the portable ONNX way; other runtimes read it too).

Every value the integer graph holds is QuantizeLinear(uint8) -> DequantizeLinear, and an op that
only moves values (reshape, permute, split, max pool) moves the uint8 value itself, as in
`qoperator` (DequantizeLinear -> move -> QuantizeLinear would move four bytes per value, and
nothing fuses it when a float island reads the result: 2x the Transpose time on deit_tiny); quantized layers
read DequantizeLinear(int8 codes, zero point 0, α or α·γ/σ per channel on axis 0) and
DequantizeLinear(int32 bias, scale x_s·w_s). onnxruntime (graph optimisations ≥ basic) fuses
DQ -> Conv/Gemm -> [Relu] -> Q into QLinearConv/QGemm, DQ -> Add -> Q into QLinearAdd and
DQ -> GlobalAveragePool -> Q into QLinearGlobalAveragePool; on x86 it wants exactly this: uint8
activations, int8 weights with zero point 0. With optimisations off it computes the float ops on
dequantized values, which agrees with the integer kernels up to one step at rounding ties.
"""
from __future__ import annotations

from qexport.ops.emit import qname, relu_node
from qexport.onnx.integer_graph import computes_float, end_integer_graph, float_island, start_integer_graph
from qexport.ops import KINDS
from qexport.ops.base import Op


def export_qdq(art, ops: list[Op], qp: dict, calib: dict, opset: int | None = None):
    ctx = start_integer_graph(art, ops, qp, opset)
    b = ctx.b
    for op in ops:
        kind = KINDS[op.kind]
        core = f"{op.out}.prerelu" if op.relu else f"{op.out}.float"
        if kind.pass_through and not computes_float(ctx, op):  # a move of a uint8 value: on the uint8 value
            kind.qoperator(ctx, op, [qname(i) for i in op.inputs], qname(op.out))
        elif not kind.float_input and not computes_float(ctx, op) and kind.qdq(ctx, op, [ctx.qpi.dq(i) for i in op.inputs], core):
            y = relu_node(b, op, core, f"{op.out}.float") if op.relu else core
            b.node("QuantizeLinear", [y, *ctx.qpi(op.out)], qname(op.out))
        else:
            float_island(ctx, op)
    return end_integer_graph(ctx, art, "qdq", calib)
