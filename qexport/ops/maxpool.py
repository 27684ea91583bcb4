"""MaxPool1d/2d (module or function): the same MaxPool on uint8 values in integer graphs (max
commutes with the order-preserving quantization, so its output keeps the input's scale)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qexport.ops.base import Ctx, Kind, Op, Unsupported, arg, pair

POOL = {1: F.max_pool1d, 2: F.max_pool2d}


class MaxPool(Kind):
    name = "maxpool"
    modules = (nn.MaxPool1d, nn.MaxPool2d)
    functions = (F.max_pool1d, F.max_pool2d)
    pass_through = True

    @staticmethod
    def _attrs(dim: int, k, s, p, d, ceil: bool, indices: bool) -> dict:
        if indices:
            raise Unsupported("return_indices=True")
        return {"dim": dim, "kernel_size": pair(k, dim), "stride": pair(s if s not in (None, []) else k, dim),
                "padding": pair(p, dim), "dilation": pair(d, dim), "ceil_mode": bool(ceil)}

    def from_module(self, m: nn.Module) -> dict:
        dim = 1 if isinstance(m, nn.MaxPool1d) else 2
        return self._attrs(dim, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        dim = 1 if target is F.max_pool1d else 2
        g = lambda i, n, d=None: arg(args, kwargs, i, n, d)  # noqa: E731
        return [args[0]], self._attrs(dim, g(1, "kernel_size"), g(2, "stride"), g(3, "padding", 0), g(4, "dilation", 1),
                                      g(5, "ceil_mode", False), g(6, "return_indices", False))

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        a = op.attrs
        return POOL[a["dim"]](xs[0], a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        a = op.attrs
        return ctx.b.node("MaxPool", ins, out, kernel_shape=a["kernel_size"], strides=a["stride"], pads=a["padding"] * 2,
                          dilations=a["dilation"], ceil_mode=int(a["ceil_mode"]))

    def runs_integer(self, op: Op, layers: dict) -> bool:
        return True  # the max of uint8 values is the uint8 of the max

    def qoperator(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        self.onnx(ctx, op, ins, out)
        return True

    def integer(self, ctx: Ctx, op: Op, qs: list[torch.Tensor]) -> torch.Tensor | None:
        return self.run(op, [qs[0].to(torch.float64)]).to(torch.int64)

    def c(self, cg, op: Op) -> bool:
        a = op.attrs
        xs, ys = cg.shapes[op.inputs[0]], cg.shapes[op.out]
        k, s, d, p = a["kernel_size"], a["stride"], a["dilation"], a["padding"]
        if a["dim"] == 1:
            g = [xs[0], 1, xs[1], 1, ys[1], 1, k[0], 1, s[0], 1, d[0], 0, p[0]]
        else:
            g = [xs[0], xs[1], xs[2], ys[1], ys[2], k[0], k[1], s[0], s[1], d[0], d[1], p[0], p[1]]
        name = cg.name("qm_pool")
        cg.decls.append(f"static const qi_pool_t {name} = {{{', '.join(f'{int(v)}u' for v in g)}}}; /* {op.name} */")
        cg.calls.append(f"qi_maxpool(&{name}, {{{op.inputs[0]}}}, {{{op.out}}}); /* {op.name} */")
        return True


KIND = MaxPool()
