"""ReLU (module, function or method). After a linear/conv/add it is folded into the integer
layer: its output is calibrated with a zero point of 0, so the uint8 clamp at 0 *is* the ReLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qexport.ops.base import Ctx, Kind, Op


class Relu(Kind):
    name = "relu"
    modules = (nn.ReLU,)
    functions = (torch.relu, F.relu, torch.relu_)
    methods = ("relu", "relu_")
    nonnegative = True

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        return [args[0]], {}

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.relu(xs[0])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        return ctx.b.node("Relu", ins, out)


KIND = Relu()
