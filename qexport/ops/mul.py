"""Elementwise product (`*`, torch.mul, Tensor.mul) of two tensors (gating, attention-style
scaling) or a tensor and a number; a float island in integer graphs."""
from __future__ import annotations

import operator

import numpy as np
import torch

from qexport.ops.add import binary_operands
from qexport.ops.base import Ctx, Kind, Op


class Mul(Kind):
    name = "mul"
    functions = (operator.mul, operator.imul, torch.mul)
    methods = ("mul", "mul_")

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        return binary_operands(args, kwargs)

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return xs[0] * (xs[1] if len(xs) > 1 else op.attrs["constant"])

    def fused_by_onnxruntime(self, op: Op) -> bool:
        return len(op.inputs) == 2  # QLinearMul (a float SE gate left it a float Mul)

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        other = ins[1] if len(ins) > 1 else ctx.b.init(f"{out}.constant", np.float32(op.attrs["constant"]))
        return ctx.b.node("Mul", [ins[0], other], out)


KIND = Mul()
