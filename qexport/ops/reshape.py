"""Tensor.view / Tensor.reshape / torch.reshape, e.g. `x.view(x.size(0), -1)`: the batch size
read from the input (`x.size(0)`, `x.shape[0]`) becomes 0 in the ONNX shape (copy that axis)."""
from __future__ import annotations

import numpy as np
import torch

from qexport.ops.base import Ctx, Op, Reshaping, Unsupported

BATCH = "batch"


class Reshape(Reshaping):
    name = "reshape"
    functions = (torch.reshape,)
    methods = ("view", "reshape")

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        shape = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if not shape and "shape" in kwargs:
            shape = list(kwargs["shape"])
        if any(s == BATCH for s in shape[1:]) or not all(s == BATCH or isinstance(s, int) for s in shape):
            raise Unsupported(f"target shape {shape}: only constant sizes, -1, and x.size(0) as the first size")
        if shape and shape[0] not in (BATCH, -1):
            raise Unsupported(f"target shape {shape} fixes the batch size: write x.view(x.size(0), ...) or x.view(-1, ...)")
        return [args[0]], {"shape": shape}

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        x = xs[0]
        return x.reshape([x.shape[0] if s == BATCH else s for s in op.attrs["shape"]])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        shape = ctx.b.init(f"{out}.shape", np.array([0 if s == BATCH else s for s in op.attrs["shape"]], np.int64))
        return ctx.b.node("Reshape", [ins[0], shape], out)



KIND = Reshape()
