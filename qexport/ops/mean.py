"""The mean over every spatial axis (`x.mean([2, 3])`, `torch.mean(x, (2, 3), keepdim=True)`):
global average pooling written as a reduction, as MnasNet and many heads write it. ONNX
GlobalAveragePool (then Flatten without keepdim); a float island in integer graphs."""
from __future__ import annotations

import torch

from qexport.ops.base import Ctx, Kind, Op, Unsupported, arg


class Mean(Kind):
    name = "mean"
    functions = (torch.mean,)
    methods = ("mean",)

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        dims = arg(args, kwargs, 1, "dim")
        if dims is None:
            raise Unsupported("a mean over every axis (batch included): give the spatial axes, e.g. x.mean([2, 3])")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if kwargs.get("dtype") is not None:
            raise Unsupported("dtype=")
        return [args[0]], {"dims": dims, "keepdim": bool(arg(args, kwargs, 2, "keepdim", False))}

    def check(self, attrs: dict, in_shapes: list[list[int]]) -> None:
        rank = len(in_shapes[0]) + 1  # with the batch axis
        dims = sorted(d % rank for d in attrs["dims"])
        if rank < 3 or dims != list(range(2, rank)):
            raise Unsupported(f"a mean over axes {attrs['dims']} of a rank-{rank} tensor: qexport takes the mean over "
                              "every axis after the channels (global average pooling)")
        attrs["dims"] = dims

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return xs[0].mean(op.attrs["dims"], keepdim=op.attrs["keepdim"])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        if op.attrs["keepdim"]:
            return ctx.b.node("GlobalAveragePool", ins, out)
        pooled = ctx.b.node("GlobalAveragePool", ins, f"{out}.pooled")
        return ctx.b.node("Flatten", [pooled], out, axis=1)


KIND = Mean()
