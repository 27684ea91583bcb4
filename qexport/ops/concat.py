"""torch.cat / torch.concat along a non-batch axis (Inception/DenseNet-style branches); a float
island in integer graphs."""
from __future__ import annotations

import torch

from qexport.ops.base import Ctx, Kind, Op, Unsupported, arg


class Concat(Kind):
    name = "concat"
    functions = (torch.cat, torch.concat)

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        tensors, dim = args[0], arg(args, kwargs, 1, "dim", 0)
        if dim == 0:
            raise Unsupported("concatenation along the batch axis (dim=0)")
        return list(tensors), {"dim": dim}

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, op.attrs["dim"])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        return ctx.b.node("Concat", ins, out, axis=op.attrs["dim"])


KIND = Concat()
