"""Softmax / LogSoftmax over one axis (module, function or method), e.g. the `F.log_softmax(x,
dim=1)` that ends many tutorial classifiers; float in every form."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qexport.ops.base import Ctx, Kind, Op, Unsupported, arg

LOG = (nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax")


class Softmax(Kind):
    name = "softmax"
    modules = (nn.Softmax, nn.LogSoftmax)
    functions = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
    methods = ("softmax", "log_softmax")

    @staticmethod
    def _attrs(log: bool, dim) -> dict:
        if dim is None:
            raise Unsupported("softmax without dim= (implicit axis): name the axis, e.g. dim=1")
        return {"log": log, "dim": int(dim)}

    def from_module(self, m: nn.Module) -> dict:
        return self._attrs(isinstance(m, nn.LogSoftmax), m.dim)

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        if kwargs.get("dtype") is not None or len(args) > 3:
            raise Unsupported("dtype=")
        log = any(target is t for t in LOG if not isinstance(t, type))
        return [args[0]], self._attrs(log, arg(args, kwargs, 1, "dim"))

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return (F.log_softmax if op.attrs["log"] else F.softmax)(xs[0], op.attrs["dim"])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        return ctx.b.node("LogSoftmax" if op.attrs["log"] else "Softmax", ins, out, axis=op.attrs["dim"])


KIND = Softmax()
