"""Elementwise float activations: ReLU6, Hardtanh, LeakyReLU, Sigmoid, Tanh, SiLU, GELU (exact
and tanh), Hardswish, Hardsigmoid. Integer graphs run them as float islands (DequantizeLinear -> op ->
QuantizeLinear); each is one `Activation` below: its modules/functions, attributes, PyTorch
function and ONNX nodes. GELU and SiLU are written with Erf/Tanh/Sigmoid so any opset >= 13 reads
them (onnxruntime fuses GELU back); the export splits SiLU into a sigmoid and a product before the
integer forms see it (`qexport.graph.fuse`), which onnxruntime runs as QLinearSigmoid and QLinearMul."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qexport.ops.base import Ctx, Kind, Op, Unsupported, arg


@dataclass(eq=False)
class Activation(Kind):
    name: str = ""
    modules: tuple = ()
    functions: tuple = ()
    methods: tuple = ()
    module_attrs: Callable[[nn.Module], dict] = lambda m: {}
    call_attrs: Callable[[tuple, dict], dict] = lambda args, kwargs: {}
    fn: Callable[..., torch.Tensor] = None
    emit: Callable[[Ctx, Op, str, str], str] = None
    nonnegative: bool = False
    min_opset: int = 13

    def from_module(self, m: nn.Module) -> dict:
        return self.module_attrs(m)

    def from_call(self, target, args: tuple, kwargs: dict) -> tuple[list, dict]:
        return [args[0]], self.call_attrs(args, kwargs)

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.fn(xs[0], **op.attrs)

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        ctx.b.need(self.min_opset, op.kind)
        return self.emit(ctx, op, ins[0], out)


def _clip(ctx: Ctx, op: Op, x: str, out: str) -> str:
    lo = ctx.b.init(f"{out}.min", np.float32(op.attrs["min_val"]))
    hi = ctx.b.init(f"{out}.max", np.float32(op.attrs["max_val"]))
    return ctx.b.node("Clip", [x, lo, hi], out)


def _silu(ctx: Ctx, op: Op, x: str, out: str) -> str:
    return ctx.b.node("Mul", [x, ctx.b.node("Sigmoid", [x], f"{out}.sigmoid")], out)


def _gelu(ctx: Ctx, op: Op, x: str, out: str) -> str:
    b = ctx.b
    half, one = b.init(f"{out}.half", np.float32(0.5)), b.init(f"{out}.one", np.float32(1.0))
    if op.attrs["approximate"] == "tanh":  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        x3 = b.node("Mul", [x, b.node("Mul", [x, x], f"{out}.x2")], f"{out}.x3")
        inner = b.node("Add", [x, b.node("Mul", [x3, b.init(f"{out}.c", np.float32(0.044715))], f"{out}.cx3")], f"{out}.poly")
        t = b.node("Tanh", [b.node("Mul", [inner, b.init(f"{out}.k", np.float32(math.sqrt(2 / math.pi)))], f"{out}.arg")], f"{out}.t")
    else:  # 0.5·x·(1 + erf(x/√2))
        t = b.node("Erf", [b.node("Div", [x, b.init(f"{out}.sqrt2", np.float32(math.sqrt(2)))], f"{out}.arg")], f"{out}.t")
    return b.node("Mul", [b.node("Mul", [x, half], f"{out}.hx"), b.node("Add", [t, one], f"{out}.1pt")], out)


def _hardsigmoid(ctx: Ctx, op: Op, x: str, out: str) -> str:
    """min(max(x + 3, 0), 6) / 6, PyTorch's own formula (ONNX HardSigmoid's α·x + β rounds otherwise)."""
    b = ctx.b
    shifted = b.node("Add", [x, b.init(f"{out}.three", np.float32(3.0))], f"{out}.shift")
    clipped = b.node("Clip", [shifted, b.init(f"{out}.zero", np.float32(0.0)), b.init(f"{out}.six", np.float32(6.0))], f"{out}.clip")
    return b.node("Div", [clipped, b.init(f"{out}.six_div", np.float32(6.0))], out)


def _hardtanh_attrs(lo: float, hi: float) -> Callable[[tuple, dict], dict]:
    return lambda args, kwargs: {"min_val": float(arg(args, kwargs, 1, "min_val", lo)),
                                 "max_val": float(arg(args, kwargs, 2, "max_val", hi))}


def _gelu_attrs(args: tuple, kwargs: dict) -> dict:
    a = kwargs.get("approximate", "none")
    if a not in ("none", "tanh"):
        raise Unsupported(f"approximate={a!r}")
    return {"approximate": a}


def _clamp(x: torch.Tensor, min_val: float, max_val: float) -> torch.Tensor:
    return torch.clamp(x, min_val, max_val)


KINDS = [
    Activation("relu6", (nn.ReLU6,), (F.relu6,), (), lambda m: {"min_val": 0.0, "max_val": 6.0},
               lambda a, k: {"min_val": 0.0, "max_val": 6.0}, _clamp, _clip, nonnegative=True),
    Activation("hardtanh", (nn.Hardtanh,), (F.hardtanh,), (),
               lambda m: {"min_val": float(m.min_val), "max_val": float(m.max_val)}, _hardtanh_attrs(-1.0, 1.0), _clamp, _clip),
    Activation("leaky_relu", (nn.LeakyReLU,), (F.leaky_relu,), (),
               lambda m: {"negative_slope": float(m.negative_slope)},
               lambda a, k: {"negative_slope": float(arg(a, k, 1, "negative_slope", 0.01))}, F.leaky_relu,
               lambda ctx, op, x, out: ctx.b.node("LeakyRelu", [x], out, alpha=op.attrs["negative_slope"])),
    Activation("sigmoid", (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",), fn=torch.sigmoid,
               emit=lambda ctx, op, x, out: ctx.b.node("Sigmoid", [x], out), nonnegative=True),
    Activation("tanh", (nn.Tanh,), (torch.tanh, F.tanh), ("tanh",), fn=torch.tanh,
               emit=lambda ctx, op, x, out: ctx.b.node("Tanh", [x], out)),
    Activation("silu", (nn.SiLU,), (F.silu,), (), fn=F.silu, emit=_silu),
    Activation("gelu", (nn.GELU,), (F.gelu,), (), lambda m: _gelu_attrs((), {"approximate": m.approximate}), _gelu_attrs,
               F.gelu, _gelu),
    Activation("hardswish", (nn.Hardswish,), (F.hardswish,), (), fn=F.hardswish,
               emit=lambda ctx, op, x, out: ctx.b.node("HardSwish", [x], out), min_opset=14),
    Activation("hardsigmoid", (nn.Hardsigmoid,), (F.hardsigmoid,), (), fn=F.hardsigmoid, emit=_hardsigmoid, nonnegative=True),
]
