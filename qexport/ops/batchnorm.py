"""nn.BatchNorm1d / 2d (eval statistics). After a linear/conv it is folded into the integer
layer's per-channel scale and bias at export; alone it runs as BatchNormalization (float)."""
from __future__ import annotations

from torch import nn

from qexport.ops.emit import bn_node
from qexport.ops.base import Ctx, Kind, Op, Unsupported

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


class BatchNorm(Kind):
    name = "batchnorm"
    modules = (nn.BatchNorm1d, nn.BatchNorm2d)
    parametric = True

    def from_module(self, m: nn.Module) -> dict:
        if not m.track_running_stats:
            raise Unsupported("BatchNorm without running statistics (track_running_stats=False)")
        return {"dim": 1 if isinstance(m, nn.BatchNorm1d) else 2, "num_features": m.num_features, "eps": m.eps,
                "momentum": m.momentum, "affine": m.affine}

    def build(self, attrs: dict) -> nn.Module:
        return BN[attrs["dim"]](attrs["num_features"], attrs["eps"], attrs["momentum"], attrs["affine"])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        return bn_node(ctx.b, op.module, op.name, ins[0], out)


KIND = BatchNorm()
