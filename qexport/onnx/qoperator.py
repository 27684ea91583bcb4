"""`--form qoperator`: integer compute with onnxruntime's QLinear operators.

input -> (x - mean)/std -> QuantizeLinear(uint8) -> QLinearConv / QGemm (int8 codes, zero point 0,
scale α, or α·γ/σ per channel with a folded BatchNorm; int32 bias with scale x_s·w_s; a following
ReLU folded into the requantization by a zero point of 0) -> QLinearAdd for residuals ->
QLinearGlobalAveragePool -> ... -> DequantizeLinear -> logits.

Linear layers use com.microsoft QGemm rather than QLinearMatMul: QGemm takes the int32 bias and
`transB`, so the codes keep the artifact's (out, in) layout and the bias needs no extra node.
Layers without an integer kernel here (a layer kept float, a lone BatchNorm/ReLU, AvgPool2d) run
as a float island DequantizeLinear -> float op -> QuantizeLinear.
"""
from __future__ import annotations

import numpy as np

from qadmm.errors import UserError
from qexport.onnx.calibrate import QParams
from qexport.onnx.builder import INPUT, MS_DOMAIN, OUTPUT, Builder, Op, conv_attrs, finish, integer_layer, metadata, normalize_nodes, pool_attrs
from qexport.onnx.weights import emit_float_op


def qname(v: str) -> str:
    """Name of the uint8 tensor holding value v (the float `logits` is the graph output)."""
    return {OUTPUT: "logits.q", INPUT: "input.q"}.get(v, v)


def check_int8(art) -> None:
    """Integer kernels take int8 weights: refuse wider codes (the thesis scheme at 8 bits, ±255)."""
    for name, lc in art.layers.items():
        if lc.codes.qmax > 127:
            raise UserError(f"layer {name} has {lc.codes.describe()} codes, which do not fit int8: integer forms "
                            f"need codes within ±127; export with --form weights (INT16) or quantize with --scheme symmetric")


class QParamInits:
    """One `<value>.scale` / `<value>.zero_point` initializer pair per quantized value."""

    def __init__(self, b: Builder, qp: dict[str, QParams]):
        self.b, self.qp, self.dqs = b, qp, set()

    def __call__(self, v: str) -> list[str]:
        s, z = f"{qname(v)}.scale", f"{qname(v)}.zero_point"
        if s not in self.b.names:
            self.b.init(s, np.float32(self.qp[v].scale))
            self.b.init(z, np.uint8(self.qp[v].zero_point))
        return [s, z]

    def dq(self, v: str) -> str:
        """The float DequantizeLinear of value v, built once however many ops read it."""
        out = f"{qname(v)}.dq"
        if out not in self.dqs:
            self.dqs.add(out)
            self.b.node("DequantizeLinear", [qname(v), *self(v)], out)
        return out


def weight_inits(b: Builder, op: Op, art, x_scale: np.float32) -> tuple[str, str, str, str]:
    """(codes, w_scale, w_zero_point, int32 bias) initializers of a quantized linear/conv."""
    il = integer_layer(op, art.layers[op.name], x_scale)
    return (b.init(f"{op.name}.codes", il.q), b.init(f"{op.name}.w_scale", il.w_scale),
            b.init(f"{op.name}.w_zero_point", np.zeros(il.w_scale.shape, np.int8)), b.init(f"{op.name}.bias_int32", il.bias))


def emit_island(b: Builder, op: Op, art, qpi: QParamInits) -> None:
    """DequantizeLinear inputs -> float op -> QuantizeLinear (same arithmetic in qdq)."""
    y = emit_float_op(b, op, [qpi.dq(i) for i in op.inputs], art.layers, f"{op.out}.float")
    b.node("QuantizeLinear", [y, *qpi(op.out)], qname(op.out))


def start_integer_graph(art, ops: list[Op], qp: dict[str, QParams]) -> tuple[Builder, QParamInits]:
    """What both integer forms begin with: refuse codes beyond int8, quantize the raw input if read."""
    check_int8(art)
    b = Builder()
    qpi = QParamInits(b, qp)
    if any(INPUT in op.inputs for op in ops):
        b.node("QuantizeLinear", [INPUT, *qpi(INPUT)], qname(INPUT))
    return b, qpi


def export_qoperator(art, ops: list[Op], qp: dict[str, QParams], calib: dict):
    b, qpi = start_integer_graph(art, ops, qp)
    for op in ops:
        x = [qname(i) for i in op.inputs]
        y = qname(op.out)
        quantized = op.kind in ("linear", "conv") and op.name in art.layers
        if op.kind == "normalize":
            b.node("QuantizeLinear", [normalize_nodes(b, op, INPUT), *qpi(op.out)], y)
        elif quantized:
            w, ws, wz, bias = weight_inits(b, op, art, qp[op.inputs[0]].scale)
            if op.kind == "conv":
                b.node("QLinearConv", [x[0], *qpi(op.inputs[0]), w, ws, wz, *qpi(op.out), bias], y, **conv_attrs(op.module))
            else:
                b.node("QGemm", [x[0], *qpi(op.inputs[0]), w, ws, wz, bias, *qpi(op.out)], y, domain=MS_DOMAIN, transB=1)
        elif op.kind == "add":
            b.node("QLinearAdd", [x[0], *qpi(op.inputs[0]), x[1], *qpi(op.inputs[1]), *qpi(op.out)], y, domain=MS_DOMAIN)
        elif op.kind == "flatten":
            b.node("Flatten", x, y, axis=1)
        elif op.kind == "maxpool":
            b.node("MaxPool", x, y, **pool_attrs(op.module))
        elif op.kind == "gap" and not op.relu:
            b.node("QLinearGlobalAveragePool", [x[0], *qpi(op.inputs[0]), *qpi(op.out)], y, domain=MS_DOMAIN, channels_last=0)
        else:
            emit_island(b, op, art, qpi)
    b.node("DequantizeLinear", [qname(OUTPUT), *qpi(OUTPUT)], OUTPUT)
    arch = art.meta["architecture"]
    return finish(b, tuple(arch["input_shape"]), arch["num_classes"], metadata(art, "qoperator", {"calibration": calib}))
