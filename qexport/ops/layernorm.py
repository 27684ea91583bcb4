"""nn.LayerNorm: ONNX LayerNormalization (opset 17), float in every form (integer graphs run it
between DequantizeLinear and QuantizeLinear)."""
from __future__ import annotations

import numpy as np
from torch import nn

from qexport.ops.base import Ctx, Kind, Op


class LayerNorm(Kind):
    name = "layernorm"
    modules = (nn.LayerNorm,)
    parametric = True
    min_opset = 17

    def from_module(self, m: nn.LayerNorm) -> dict:
        return {"normalized_shape": list(m.normalized_shape), "eps": m.eps, "affine": m.elementwise_affine,
                "bias": m.bias is not None}

    def build(self, attrs: dict) -> nn.Module:
        return nn.LayerNorm(attrs["normalized_shape"], attrs["eps"], attrs["affine"], bias=attrs["bias"])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        b, m = ctx.b, op.module
        b.need(self.min_opset, "LayerNormalization")
        shape = op.attrs["normalized_shape"]
        gamma = m.weight.detach().numpy() if m.weight is not None else np.ones(shape, np.float32)
        args = [ins[0], b.init(f"{op.name}.ln_scale", gamma.astype(np.float32))]
        if m.bias is not None:
            args.append(b.init(f"{op.name}.ln_bias", m.bias.detach().numpy().astype(np.float32)))
        return b.node("LayerNormalization", args, out, axis=-len(shape), epsilon=float(m.eps))


KIND = LayerNorm()
