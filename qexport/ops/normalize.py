"""qexport's input standardisation (x - mean) / std, from `--normalize` or a zoo model: it reads
the raw float input, so integer graphs quantize its output, not the input.

With one mean and one std for all features (MNIST-like images), integer graphs fold it into the
input's QuantizeLinear: with S = s·std and mean/S a whole number k,
round(((x - mean)/std)/s) + zp = round(x/S) + (zp - k) in exact arithmetic, so one
QuantizeLinear(x, S, zp - k) replaces Sub, Div and QuantizeLinear (a fifth of the MLP's kernel
time). Calibration picks s with mean/(s·std) whole (never a narrower range than calibrated). The
file's arithmetic is x/S; the verifier's reference computes that same division.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from qadmm.zoo import Normalize as NormalizeModule
from qexport.ops.integer import QParams
from qexport.ops.base import Ctx, Kind, Op

ALIGNED = 1e-3  # |mean/S - k| below this counts as whole (it only shifts the grid by that much of a step)


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

    @staticmethod
    def _scalar(op: Op) -> tuple[float, float] | None:
        """(mean, std) when every feature shares them, as the fp32 values the graph holds."""
        mean, std = op.module.mean.numpy().astype(np.float32), op.module.std.numpy().astype(np.float32)
        if mean.size == 0 or (mean != mean.flat[0]).any() or (std != std.flat[0]).any() or not std.flat[0] > 0:
            return None
        return float(mean.flat[0]), float(std.flat[0])

    def calibrated(self, op: Op, p: QParams, lo: float) -> QParams:
        ms = self._scalar(op)
        if ms is None or ms[0] == 0.0:
            return p
        mean, std = ms
        k = math.trunc(mean / (std * float(p.scale)))  # toward zero: the new scale is never smaller
        if k == 0:
            return p  # the mean is less than one step: nothing to align
        s = np.float32(mean / (k * std))
        aligned = QParams(s, np.uint8(np.clip(np.round(np.float32(-min(lo, 0.0)) / s), 0, 255)))
        return aligned if self.input_qparams(op, aligned) is not None else p

    def input_qparams(self, op: Op, p: QParams) -> QParams | None:
        ms = self._scalar(op)
        if ms is None:
            return None
        mean, std = ms
        S = np.float32(np.float32(p.scale) * np.float32(std))
        k = mean / float(S)
        z = int(p.zero_point) - round(k)
        if abs(k - round(k)) > ALIGNED or not 0 <= z <= 255:
            return None
        return QParams(S, np.uint8(z))

    def c(self, cg, op: Op) -> bool:
        raw = self.input_qparams(op, cg.qp[op.out])
        if raw is None:
            return False  # per-channel statistics: the float normalisation has no C kernel yet
        cg.calls.append(f"qi_quantize({cg.size(op.out)}u, input, {cg.f32(raw.scale)}, {int(raw.zero_point)}u, {{{op.out}}}); "
                        "/* the normalisation, folded into the input's quantization */")
        return True


KIND = Normalize()
