"""`--form qdq`: the same quantization as `qoperator`, written as QuantizeLinear/DequantizeLinear
pairs around float operators (the portable ONNX way; other runtimes read it too).

Every value the integer graph holds is QuantizeLinear(uint8) -> DequantizeLinear; quantized layers
read DequantizeLinear(int8 codes, zero point 0, α or α·γ/σ per channel on axis 0) and
DequantizeLinear(int32 bias, scale x_s·w_s). onnxruntime (graph optimisations ≥ basic) fuses
DQ -> Conv/Gemm -> [Relu] -> Q into QLinearConv/QGemm, DQ -> Add -> Q into QLinearAdd and
DQ -> GlobalAveragePool -> Q into QLinearGlobalAveragePool; on x86 it wants exactly this: uint8
activations, int8 weights with zero point 0. With optimisations off it computes the float ops on
dequantized values, which agrees with the integer kernels up to one step at rounding ties.
"""
from __future__ import annotations

import numpy as np

from qexport.onnx.calibrate import QParams
from qexport.onnx.builder import INPUT, OUTPUT, Op, conv_attrs, finish, integer_layer, metadata, normalize_nodes
from qexport.onnx.qoperator import qname, start_integer_graph
from qexport.onnx.weights import emit_float_op


def export_qdq(art, ops: list[Op], qp: dict[str, QParams], calib: dict):
    b, qpi = start_integer_graph(art, ops, qp)
    for op in ops:
        y = qname(op.out)
        if op.kind == "normalize":
            b.node("QuantizeLinear", [normalize_nodes(b, op, INPUT), *qpi(op.out)], y)
            continue
        x = [qpi.dq(i) for i in op.inputs]
        if op.kind in ("linear", "conv") and op.name in art.layers:
            il = integer_layer(op, art.layers[op.name], qp[op.inputs[0]].scale)
            cout = il.q.shape[0]
            axis = {"axis": 0} if il.w_scale.ndim else {}
            w = b.node("DequantizeLinear", [b.init(f"{op.name}.codes", il.q), b.init(f"{op.name}.w_scale", il.w_scale),
                                            b.init(f"{op.name}.w_zero_point", np.zeros(il.w_scale.shape, np.int8))], f"{op.name}.weight", **axis)
            bias = b.node("DequantizeLinear", [b.init(f"{op.name}.bias_int32", il.bias), b.init(f"{op.name}.bias_scale", il.bias_scale),
                                               b.init(f"{op.name}.bias_zero_point", np.zeros(cout, np.int32))], f"{op.name}.bias", axis=0)
            core = f"{op.out}.float" if not op.relu else f"{op.out}.prerelu"
            if op.kind == "conv":
                b.node("Conv", [x[0], w, bias], core, **conv_attrs(op.module))
            else:
                b.node("Gemm", [x[0], w, bias], core, transB=1)
            yf = b.node("Relu", [core], f"{op.out}.float") if op.relu else core
        else:
            yf = emit_float_op(b, op, x, art.layers, f"{op.out}.float")
        b.node("QuantizeLinear", [yf, *qpi(op.out)], y)
    b.node("DequantizeLinear", [qname(OUTPUT), *qpi(OUTPUT)], OUTPUT)
    arch = art.meta["architecture"]
    return finish(b, tuple(arch["input_shape"]), arch["num_classes"], metadata(art, "qdq", {"calibration": calib}))
