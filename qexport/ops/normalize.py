"""qexport's input standardisation (x - mean) / std, from `--normalize` or a zoo model: it reads
the raw float input, so integer graphs quantize its output, not the input."""
from __future__ import annotations

import numpy as np
import torch

from qadmm.zoo import Normalize as NormalizeModule
from qexport.ops.base import Ctx, Kind, Op


class Normalize(Kind):
    name = "normalize"
    modules = (NormalizeModule,)
    parametric = True
    float_input = True

    def from_module(self, m: NormalizeModule) -> dict:
        return {"shape": list(m.mean.shape)}

    def build(self, attrs: dict) -> torch.nn.Module:
        return NormalizeModule(np.zeros(attrs["shape"], np.float32), np.ones(attrs["shape"], np.float32))

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        b = ctx.b
        mean = op.module.mean.numpy().astype(np.float32)
        std = op.module.std.numpy().astype(np.float32)
        b.node("Sub", [ins[0], b.init(f"{op.name}.mean", mean)], f"{out}.centered")
        return b.node("Div", [f"{out}.centered", b.init(f"{op.name}.std", std)], out)


KIND = Normalize()
