"""nn.Conv1d / nn.Conv2d (groups, dilation, 'same'/'valid' padding): QLinearConv in QOperator
graphs, DQ -> Conv in QDQ, Conv in float. Only zero padding: ONNX Conv pads with zeros."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qexport.ops.emit import float_bias, float_weight, int_weight, integer_layer
from qexport.ops.integer import qlinear
from qexport.ops.base import Ctx, Kind, Op, Unsupported
from qexport.ops.linear import dq_weight_and_bias

CONV = {1: nn.Conv1d, 2: nn.Conv2d}


class Conv(Kind):
    name = "conv"
    modules = (nn.Conv1d, nn.Conv2d)
    parametric = True

    def from_module(self, m: nn.Module) -> dict:
        if m.padding_mode != "zeros":
            raise Unsupported(f"padding_mode={m.padding_mode!r}; ONNX Conv pads with zeros only")
        return {"dim": 1 if isinstance(m, nn.Conv1d) else 2, "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None}

    def build(self, attrs: dict) -> nn.Module:
        return CONV[attrs["dim"]](attrs["in_channels"], attrs["out_channels"], attrs["kernel_size"], attrs["stride"],
                                  attrs["padding"], attrs["dilation"], attrs["groups"], attrs["bias"])

    @staticmethod
    def pads(attrs: dict) -> list[int]:
        """ONNX pads (begins, then ends); 'same' puts the odd pixel at the end, as PyTorch does."""
        p, k, d = attrs["padding"], attrs["kernel_size"], attrs["dilation"]
        if p == "valid":
            return [0] * (2 * attrs["dim"])
        if p == "same":
            total = [di * (ki - 1) for ki, di in zip(k, d)]
            return [t // 2 for t in total] + [t - t // 2 for t in total]
        return list(p) * 2

    def attrs(self, op: Op) -> dict:
        a = op.attrs
        return {"kernel_shape": a["kernel_size"], "strides": a["stride"], "pads": self.pads(a), "dilations": a["dilation"],
                "group": a["groups"]}

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        return ctx.b.node("Conv", [ins[0], float_weight(ctx, op), *float_bias(ctx, op)], out, **self.attrs(op))

    def runs_integer(self, op: Op, layers: dict) -> bool:
        return op.name in layers  # a layer left in float is a float island

    def qoperator(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        if not self.runs_integer(op, ctx.layers):
            return False
        _, (w, ws, wz, bias) = int_weight(ctx, op)
        ctx.b.node("QLinearConv", [ins[0], *ctx.qpi(op.inputs[0]), w, ws, wz, *ctx.qpi(op.out), bias], out, **self.attrs(op))
        return True

    def qdq(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        if not self.runs_integer(op, ctx.layers):
            return False
        ctx.b.node("Conv", [ins[0], *dq_weight_and_bias(ctx, op)], out, **self.attrs(op))
        return True

    def integer(self, ctx: Ctx, op: Op, qs: list[torch.Tensor]) -> torch.Tensor | None:
        a = op.attrs
        conv = F.conv1d if a["dim"] == 1 else F.conv2d
        il = integer_layer(op, ctx.layers[op.name], ctx.qp[op.inputs[0]].scale)
        return qlinear(il, qs[0], ctx.qp[op.inputs[0]], ctx.qp[op.out],
                       lambda x, w: conv(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"]))

    def c(self, cg, op: Op) -> bool:
        if op.name not in cg.layers:
            return False
        a = op.attrs
        il = integer_layer(op, cg.layers[op.name], cg.qp[op.inputs[0]].scale)
        xs, ys = cg.shapes[op.inputs[0]], cg.shapes[op.out]
        k, s, d, p = a["kernel_size"], a["stride"], a["dilation"], self.pads(a)  # pads: begins, then ends
        if a["dim"] == 1:  # a row: h = 1
            geo = {"cin": xs[0], "w": xs[1], "wo": ys[1], "kw": k[0], "sw": s[0], "dw": d[0], "pw": p[0]}
        else:
            geo = {"cin": xs[0], "h": xs[1], "w": xs[2], "ho": ys[1], "wo": ys[2], "kh": k[0], "kw": k[1], "sh": s[0],
                   "sw": s[1], "dh": d[0], "dw": d[1], "ph": p[0], "pw": p[1]}
        layer = cg.layer(op, il, {**geo, "groups": a["groups"]})
        cg.calls.append(f"qi_conv(&{layer}, {{{op.inputs[0]}}}, {{{op.out}}}); /* {op.name} */")
        return True


KIND = Conv()
