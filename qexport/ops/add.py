"""Elementwise sum of two tensors (residual connections; `+`, `+=`, torch.add, Tensor.add):
QLinearAdd (com.microsoft) in QOperator graphs. A tensor plus a constant is a float island."""
from __future__ import annotations

import operator

import numpy as np
import torch

from qexport.ops.emit import MS_DOMAIN
from qexport.ops.integer import qadd, qadd_constants
from qexport.ops.base import Ctx, Kind, Op, Unsupported


def binary_operands(args: tuple, kwargs: dict) -> tuple[list, dict]:
    """(tensor operands, attrs) of `a op b`: two tensors, or one tensor and a number."""
    if kwargs.get("alpha", 1) != 1:
        raise Unsupported("alpha != 1")
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    if isinstance(a, (int, float)) and isinstance(b, str):
        a, b = b, a
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return [a], {"constant": float(b)}
    return [a, b], {}


class Add(Kind):
    name = "add"
    functions = (operator.add, operator.iadd, torch.add)
    methods = ("add", "add_")

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        return binary_operands(args, kwargs)

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return xs[0] + (xs[1] if len(xs) > 1 else op.attrs["constant"])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        other = ins[1] if len(ins) > 1 else ctx.b.init(f"{out}.constant", np.float32(op.attrs["constant"]))
        return ctx.b.node("Add", [ins[0], other], out)

    def runs_integer(self, op: Op, layers: dict) -> bool:
        return len(op.inputs) == 2  # a tensor plus a constant: a float island

    def qoperator(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        if not self.runs_integer(op, ctx.layers):
            return False
        qpi = ctx.qpi
        ctx.b.node("QLinearAdd", [ins[0], *qpi(op.inputs[0]), ins[1], *qpi(op.inputs[1]), *qpi(op.out)], out, domain=MS_DOMAIN)
        return True

    def integer(self, ctx: Ctx, op: Op, qs: list[torch.Tensor]) -> torch.Tensor | None:
        qp = ctx.qp
        return qadd(qs[0], qp[op.inputs[0]], qs[1], qp[op.inputs[1]], qp[op.out])

    def c(self, cg, op: Op) -> bool:
        a, b = (op.inputs + [None, None])[:2]
        if len(op.inputs) != 2 or cg.shapes[a] != cg.shapes[b] or cg.shapes[a] != cg.shapes[op.out]:
            return False  # broadcasting: no C kernel
        ra, rb, k = qadd_constants(cg.qp[a], cg.qp[b], cg.qp[op.out])
        cg.calls.append(f"qi_add({cg.size(op.out)}u, {{{a}}}, {{{b}}}, {cg.f32(ra)}, {cg.f32(rb)}, {cg.f32(k)}, {{{op.out}}}); "
                        f"/* {op.name} */")
        return True


KIND = Add()
