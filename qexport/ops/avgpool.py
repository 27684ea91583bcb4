"""AvgPool1d/2d and AdaptiveAvgPool1d/2d (modules or functions). Global average pooling (output
size 1) is QLinearGlobalAveragePool in QOperator graphs; an adaptive size that divides the input
becomes AveragePool with kernel = stride = input/output; any other pooling is a float island."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qexport.ops.emit import MS_DOMAIN
from qexport.ops.integer import qgap, qgap_scale
from qexport.ops.base import Ctx, Kind, Op, Unsupported, arg, pair

ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
ADAPTIVE_FNS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)


class AvgPool(Kind):
    name = "avgpool"
    modules = (nn.AvgPool1d, nn.AvgPool2d, *ADAPTIVE)
    functions = (F.avg_pool1d, F.avg_pool2d, *ADAPTIVE_FNS)

    @staticmethod
    def _fixed(dim: int, k, s, p, ceil: bool, include_pad: bool, divisor) -> dict:
        if divisor is not None:
            raise Unsupported("divisor_override")
        return {"dim": dim, "kernel_size": pair(k, dim), "stride": pair(s if s not in (None, []) else k, dim),
                "padding": pair(p, dim), "ceil_mode": bool(ceil), "count_include_pad": bool(include_pad)}

    def from_module(self, m: nn.Module) -> dict:
        dim = 1 if isinstance(m, (nn.AvgPool1d, nn.AdaptiveAvgPool1d)) else 2
        if isinstance(m, ADAPTIVE):
            return {"dim": dim, "output_size": m.output_size if isinstance(m.output_size, (list, tuple)) else [m.output_size] * dim}
        return self._fixed(dim, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                           getattr(m, "divisor_override", None))

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        dim = 1 if target in (F.avg_pool1d, F.adaptive_avg_pool1d) else 2
        g = lambda i, n, d=None: arg(args, kwargs, i, n, d)  # noqa: E731
        if any(target is f for f in ADAPTIVE_FNS):
            size = g(1, "output_size")
            return [args[0]], {"dim": dim, "output_size": list(size) if isinstance(size, (list, tuple)) else [size] * dim}
        return [args[0]], self._fixed(dim, g(1, "kernel_size"), g(2, "stride"), g(3, "padding", 0), g(4, "ceil_mode", False),
                                      g(5, "count_include_pad", True), g(6, "divisor_override"))

    def check(self, attrs: dict, in_shapes: list[list[int]]) -> None:
        """Adaptive pooling: record the fixed kernel it amounts to on this input size."""
        if "output_size" not in attrs:
            return
        size = in_shapes[0][1:]
        out = [s if o is None else o for o, s in zip(attrs["output_size"], size)]
        if any(s % o for s, o in zip(size, out)):
            raise Unsupported(f"adaptive output size {tuple(out)} on input {tuple(size)}: ONNX pooling expresses only "
                              "output sizes that divide the input")
        attrs["output_size"] = out
        attrs["global"] = all(o == 1 for o in out)
        k = [s // o for s, o in zip(size, out)]
        attrs.update(kernel_size=k, stride=k, padding=[0] * len(k), ceil_mode=False, count_include_pad=True)

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        a = op.attrs
        if "output_size" in a:
            return (F.adaptive_avg_pool1d if a["dim"] == 1 else F.adaptive_avg_pool2d)(xs[0], a["output_size"])
        pool = F.avg_pool1d if a["dim"] == 1 else F.avg_pool2d
        return pool(xs[0], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        a = op.attrs
        if a.get("global"):
            return ctx.b.node("GlobalAveragePool", ins, out)
        return ctx.b.node("AveragePool", ins, out, kernel_shape=a["kernel_size"], strides=a["stride"], pads=a["padding"] * 2,
                          ceil_mode=int(a["ceil_mode"]), count_include_pad=int(a["count_include_pad"]))

    def runs_integer(self, op: Op, layers: dict) -> bool:
        return bool(op.attrs.get("global")) and not op.relu

    def qoperator(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        if not self.runs_integer(op, ctx.layers):
            return False
        ctx.b.node("QLinearGlobalAveragePool", [ins[0], *ctx.qpi(op.inputs[0]), *ctx.qpi(op.out)], out, domain=MS_DOMAIN,
                   channels_last=0)
        return True

    def integer(self, ctx: Ctx, op: Op, qs: list[torch.Tensor]) -> torch.Tensor | None:
        return qgap(qs[0], ctx.qp[op.inputs[0]], ctx.qp[op.out])

    def c(self, cg, op: Op) -> bool:
        if not op.attrs.get("global") or op.relu:
            return False
        xs = cg.shapes[op.inputs[0]]
        n = int(np.prod(xs[1:], dtype=np.int64))
        px, py = cg.qp[op.inputs[0]], cg.qp[op.out]
        cg.calls.append(f"qi_global_avgpool({xs[0]}u, {n}u, {{{op.inputs[0]}}}, {cg.f32(qgap_scale(px, py, n))}, "
                        f"{int(px.zero_point)}u, {int(py.zero_point)}u, {{{op.out}}}); /* {op.name} */")
        return True


KIND = AvgPool()
