"""Flatten (module, torch.flatten, Tensor.flatten): ONNX Flatten for (batch, features), else a
Reshape to the traced shape. Integer graphs reshape the uint8 value itself (same scale)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qexport.ops.base import Ctx, Op, Reshaping, Unsupported, arg


class Flatten(Reshaping):
    name = "flatten"
    modules = (nn.Flatten,)
    functions = (torch.flatten,)
    methods = ("flatten",)

    def from_module(self, m: nn.Flatten) -> dict:
        return {"start_dim": m.start_dim, "end_dim": m.end_dim}

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        start, end = arg(args, kwargs, 1, "start_dim", 0), arg(args, kwargs, 2, "end_dim", -1)
        if start == 0:
            raise Unsupported("flattening the batch axis (start_dim=0): use torch.flatten(x, 1)")
        return [args[0]], {"start_dim": start, "end_dim": end}

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.flatten(xs[0], op.attrs["start_dim"], op.attrs["end_dim"])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        if op.attrs["start_dim"] == 1 and op.attrs["end_dim"] == -1:
            return ctx.b.node("Flatten", ins, out, axis=1)
        shape = ctx.b.init(f"{out}.shape", np.array([0, *ctx.shapes[op.out]], np.int64))
        return ctx.b.node("Reshape", [ins[0], shape], out)



KIND = Flatten()
