"""nn.Linear: QGemm (com.microsoft) in QOperator graphs, DQ -> Gemm in QDQ, Gemm in float.

On tokens (batch, ..., features), as in a transformer, the integer forms reshape the uint8 input
to rows (exact: reshaping moves values), run the same QGemm, and reshape the rows back; the float
form uses MatMul + Add."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qexport.ops.emit import MS_DOMAIN, float_bias, float_weight, int_weight, integer_layer, qname
from qexport.ops.integer import qlinear
from qexport.ops.base import Ctx, Kind, Op, Unsupported


class Linear(Kind):
    name = "linear"
    modules = (nn.Linear,)
    parametric = True

    def from_module(self, m: nn.Linear) -> dict:
        return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}

    def check(self, attrs: dict, in_shapes: list[list[int]]) -> None:
        if not in_shapes[0] or in_shapes[0][-1] != attrs["in_features"]:
            raise Unsupported(f"Linear({attrs['in_features']}, ...) on a tensor of shape (batch, "
                              f"{', '.join(map(str, in_shapes[0]))})")

    @staticmethod
    def on_rows(ctx: Ctx, op: Op) -> bool:
        """Its input is (batch, features); else tokens (batch, ..., features)."""
        return len(ctx.shapes.get(op.inputs[0], [0])) == 1

    def build(self, attrs: dict) -> nn.Module:
        return nn.Linear(attrs["in_features"], attrs["out_features"], bias=attrs["bias"])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        b = ctx.b
        if self.on_rows(ctx, op):
            return b.node("Gemm", [ins[0], float_weight(ctx, op), *float_bias(ctx, op)], out, transB=1)
        wt = b.node("Transpose", [float_weight(ctx, op)], f"{op.name}.weight_t", perm=[1, 0])
        bias = float_bias(ctx, op)
        y = b.node("MatMul", [ins[0], wt], f"{out}.matmul" if bias else out)
        return b.node("Add", [y, bias[0]], out) if bias else y

    def runs_integer(self, op: Op, layers: dict) -> bool:
        return op.name in layers  # a layer left in float is a float island

    def qoperator(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        if not self.runs_integer(op, ctx.layers):
            return False
        _, (w, ws, wz, bias) = int_weight(ctx, op)
        x = ins[0] if self.on_rows(ctx, op) else to_rows(ctx, op, ins[0])
        y = ctx.b.node("QGemm", [x, *ctx.qpi(op.inputs[0]), w, ws, wz, bias, *ctx.qpi(op.out)],
                       out if self.on_rows(ctx, op) else f"{out}.rows", domain=MS_DOMAIN, transB=1)
        if not self.on_rows(ctx, op):
            from_rows(ctx, op, y, ins[0], out)
        return True

    def qdq(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        if not self.runs_integer(op, ctx.layers):
            return False
        x = ins[0] if self.on_rows(ctx, op) else to_rows(ctx, op, ins[0])
        y = ctx.b.node("Gemm", [x, *dq_weight_and_bias(ctx, op)], out if self.on_rows(ctx, op) else f"{out}.rows", transB=1)
        if not self.on_rows(ctx, op):  # the leading axes from the uint8 input: once onnxruntime fuses the
            from_rows(ctx, op, y, qname(op.inputs[0]), out)  # Gemm, a Shape of the float one would keep its DequantizeLinear
        return True

    def integer(self, ctx: Ctx, op: Op, qs: list[torch.Tensor]) -> torch.Tensor | None:
        il = integer_layer(op, ctx.layers[op.name], ctx.qp[op.inputs[0]].scale)
        x = qs[0].reshape(-1, qs[0].shape[-1])
        y = qlinear(il, x, ctx.qp[op.inputs[0]], ctx.qp[op.out], lambda x, w: x @ w.T)
        return y.reshape(*qs[0].shape[:-1], y.shape[-1])

    def c(self, cg, op: Op) -> bool:
        if op.name not in cg.layers:
            return False
        il = integer_layer(op, cg.layers[op.name], cg.qp[op.inputs[0]].scale)
        rows = int(np.prod(cg.shapes[op.inputs[0]][:-1], dtype=np.int64))
        layer = cg.layer(op, il, {"cin": op.attrs["in_features"]})
        cg.calls.append(f"qi_linear(&{layer}, {rows}u, {{{op.inputs[0]}}}, {{{op.out}}}); /* {op.name} */")
        return True


def to_rows(ctx: Ctx, op: Op, x: str) -> str:
    """(batch, ..., features) -> (rows, features)."""
    b = ctx.b
    return b.node("Reshape", [x, b.init(f"{op.out}.rows_shape", np.array([-1, op.attrs["in_features"]], np.int64))],
                  f"{op.out}.in_rows")


def from_rows(ctx: Ctx, op: Op, y: str, x: str, out: str) -> str:
    """(rows, out_features) -> (batch, ..., out_features), the leading axes read from the input x."""
    b = ctx.b
    lead = b.node("Slice", [b.node("Shape", [x], f"{op.out}.in_shape"), b.init(f"{op.out}.lead_start", np.array([0], np.int64)),
                            b.init(f"{op.out}.lead_end", np.array([-1], np.int64))], f"{op.out}.lead")
    shape = b.node("Concat", [lead, b.init(f"{op.out}.features", np.array([op.attrs["out_features"]], np.int64))],
                   f"{op.out}.out_shape", axis=0)
    return b.node("Reshape", [y, shape], out)


def dq_weight_and_bias(ctx: Ctx, op: Op) -> list[str]:
    """QDQ weights: DequantizeLinear(int8 codes, w_scale, 0) and DequantizeLinear(int32 bias,
    x_s·w_s, 0), the pattern onnxruntime fuses with the surrounding Q/DQ into an integer kernel."""
    b = ctx.b
    il, (w, ws, wz, bias) = int_weight(ctx, op)
    axis = {"axis": 0} if il.w_scale.ndim else {}
    wdq = b.node("DequantizeLinear", [w, ws, wz], f"{op.name}.weight", **axis)
    bdq = b.node("DequantizeLinear", [bias, b.init(f"{op.name}.bias_scale", il.bias_scale),
                                      b.init(f"{op.name}.bias_zero_point", np.zeros(il.q.shape[0], np.int32))],
                 f"{op.name}.bias", axis=0)
    return [wdq, bdq]


KIND = Linear()
