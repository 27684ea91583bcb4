"""What the op kinds and the ONNX forms use to write nodes: the graph under construction (`Builder`),
BatchNorm folding and the int8/int32 layout of a quantized layer, its weight initializers (the one place
their names are spelled), the activation quantization parameters' initializers, and an op's float nodes.
It lives with the op kinds, below `qexport.onnx`: the kinds use it, and the forms use the kinds.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import torch
from torch import nn

from qadmm.errors import UserError
from qadmm.spec import LayerCodes

if TYPE_CHECKING:  # at run time the kinds are imported where used: their modules import this one
    from qexport.ops.base import Ctx, Op

MS_DOMAIN = "com.microsoft"


# ---------------------------------------------------------------------------------------------
# BatchNorm folding into per-channel scales (integer forms).

@dataclass
class Folded:
    """A linear/conv with its BatchNorm folded: y = scale_c·(Q'·x) + bias_c, where Q' = sign_c·Q.

    scale (float32, (C,) or ()) is α·γ/σ rounded once to float32 and made positive; `sign` (±1
    per channel) is carried by the codes, so the file's codes are the artifact's up to that flip.
    """

    q: np.ndarray  # int8 codes, sign-flipped where the BN factor is negative
    scale: np.ndarray  # float32 > 0
    bias: np.ndarray | None  # float64 bias after folding, or None
    sign: np.ndarray  # int8 ±1 per output channel


def fold(q: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module | None) -> Folded:
    q = q.numpy().astype(np.int64)
    a = alpha.numpy().astype(np.float64)
    b = None if bias is None else bias.detach().numpy().astype(np.float64)
    cout = q.shape[0]
    sign = np.ones(cout, dtype=np.int8)
    if bn is None:
        return Folded(q.astype(np.int8), alpha.numpy().astype(np.float32), b, sign)
    # eval BatchNorm: y = γ (z - μ)/sqrt(var + eps) + β = f·z + (β - f·μ), f = γ/σ
    sigma = np.sqrt(bn.running_var.numpy().astype(np.float64) + bn.eps)
    gamma = bn.weight.detach().numpy().astype(np.float64) if bn.affine else np.ones(cout)
    beta = bn.bias.detach().numpy().astype(np.float64) if bn.affine else np.zeros(cout)
    f = gamma / sigma
    scale = np.broadcast_to(a, (cout,)) * f
    sign = np.where(scale < 0, -1, 1).astype(np.int8)
    s32 = np.abs(scale).astype(np.float32)
    s32 = np.where(s32 > 0, s32, np.float32(1e-30))  # γ=0: channel is constant β, codes irrelevant
    new_b = beta - f * bn.running_mean.numpy().astype(np.float64) + (f * b if b is not None else 0.0)
    qf = q * sign.reshape(-1, *([1] * (q.ndim - 1)))
    return Folded(qf.astype(np.int8), s32, new_b, sign)


# Headroom for the int32 accumulator: the bias may use at most 2^30 steps of x_s·w_s.
BIAS_LIMIT = 2.0**30


@dataclass
class IntLayer:
    """A linear/conv as the integer kernels take it: int8 codes (zero point 0), weight scale,
    int32 bias with scale x_s·w_s (float32 product, as ORT's quantizer and QDQ fusion expect)."""

    q: np.ndarray
    w_scale: np.ndarray  # float32, () or (C,)
    bias: np.ndarray  # int32 (C,)
    bias_scale: np.ndarray  # float32 (C,)
    sign: np.ndarray  # ±1 per channel (folded BatchNorm with a negative factor)
    widened: int  # channels whose scale was raised so the bias fits (see below)


def integer_layer(op: Op, lc, x_scale: np.float32) -> IntLayer:
    """Fold the BatchNorm, then b_q = round_half_even(b / (x_s·w_s)).

    A channel whose folded scale is vanishingly small (γ ≈ 0: the channel is the constant β)
    would need a bias beyond int32; its scale is raised just enough for the bias to fit, which
    changes that channel's output by far less than one step, and is counted in `widened`."""
    f = fold(lc.q, lc.alpha, op.module.bias, op.bn)
    cout = f.q.shape[0]
    w_scale = f.scale
    widened = 0
    if f.bias is not None:
        bscale = np.float32(x_scale) * np.broadcast_to(w_scale, (cout,)).astype(np.float32)
        need = np.abs(f.bias) / BIAS_LIMIT > bscale
        if need.any():
            wide = np.broadcast_to(w_scale, (cout,)).astype(np.float32).copy()
            wide[need] = np.nextafter((np.abs(f.bias[need]) / BIAS_LIMIT / np.float32(x_scale)).astype(np.float32), np.float32(np.inf))
            w_scale, widened = wide, int(need.sum())
    bscale = (np.float32(x_scale) * np.broadcast_to(w_scale, (cout,)).astype(np.float32)).astype(np.float32)
    bq = np.zeros(cout, np.int32) if f.bias is None else np.round(f.bias / bscale.astype(np.float64)).astype(np.int32)
    return IntLayer(f.q, np.asarray(w_scale, np.float32), bq, bscale, f.sign, widened)


# ---------------------------------------------------------------------------------------------
# Graph building.

# Opset each feature needs: per-axis QuantizeLinear/DequantizeLinear (13), INT4/INT16
# DequantizeLinear inputs (21), INT2 (25). `--opset` below 25 stores 2-bit codes as INT4, below 21
# as INT8, so older runtimes load the file (at a larger size).
MIN_OPSET = 13
INT_TYPES = (("INT2", ml_dtypes.int2, 1, 25), ("INT4", ml_dtypes.int4, 7, 21), ("INT8", np.int8, 127, 13),
             ("INT16", np.int16, 32767, 21))


@dataclass
class Builder:
    """Accumulates nodes and initializers; names are the caller's, checked for uniqueness.

    `opset` is the one the user asked for (None: the lowest the graph needs); emitters call
    `need(v, why)` for what they use, and read `opset` to choose between alternatives. `floor`
    holds what no alternative avoids: the lowest opset the graph can be written at (`--opset`)."""

    opset: int | None = None
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    names: set = field(default_factory=set)
    needed: dict = field(default_factory=lambda: {MIN_OPSET: "QuantizeLinear/DequantizeLinear per channel"})
    floor: dict = field(default_factory=lambda: {MIN_OPSET: "QuantizeLinear/DequantizeLinear per channel"})
    uses_ms: bool = False
    dequant: str = "cast"  # how float compute gets its weights from the codes: see `float_weight`

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self.names:
            raise AssertionError(f"duplicate initializer {name}")
        self.names.add(name)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op_type: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        if domain == MS_DOMAIN:
            self.uses_ms = True
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, domain=domain or None, **attrs))
        return output

    def need(self, opset: int, why: str, lowest: int | None = None) -> None:
        """The graph uses something of `opset`; `lowest`: the opset at which an alternative would
        do (a wider weight type), when the builder has one."""
        self.needed.setdefault(opset, why)
        self.floor.setdefault(opset if lowest is None else lowest, why)

    def allows(self, opset: int) -> bool:
        return self.opset is None or self.opset >= opset


def narrowest_type(b: Builder, lc: LayerCodes) -> tuple[str, type]:
    """The smallest signed ONNX integer type holding every code of the layer that the opset allows."""
    fits = [(name, dtype, opset) for name, dtype, qmax, opset in INT_TYPES if lc.codes.qmax <= qmax]
    for name, dtype, opset in fits:
        if b.allows(opset):
            b.need(opset, f"{name} weights", lowest=min(o for _, _, o in fits))
            return name, dtype
    raise UserError(f"{lc.codes.describe()} codes need INT16 weights, which need opset 21: use --opset 21 or higher")


# How the float compute of the `weights` form (and float islands) gets its weights from the codes.
# `cast`: Cast(codes -> float) · α. onnxruntime constant-folds both nodes at load under its default
# settings, so the file keeps N bits per weight and runs at fp32 speed; α·Q is one fp32 product,
# what the reference computes. `dequantizelinear`: the same values through DequantizeLinear, which
# onnxruntime keeps by default for its QDQ fusions (dequantizing every weight on every run, and
# fusing DQ(INT4/INT8) -> MatMul into kernels that quantize activations); it needs
# session.disable_quant_qdq=1 to fold (see `runner.faithful_config`). Choices: `export.DEQUANT`.


def float_weight(ctx: Ctx, op: Op) -> str:
    """A linear/conv weight for float compute named `<layer>.weight`: the codes (narrowest int
    type) dequantized with α per tensor or per output channel, else the float weight itself."""
    from onnx import TensorProto

    b, lc = ctx.b, ctx.layers.get(op.name)
    if lc is None:
        return b.init(f"{op.name}.weight", op.module.weight.detach().numpy().astype(np.float32))
    _, dtype = narrowest_type(b, lc)
    codes = b.init(f"{op.name}.codes", lc.q.numpy().astype(dtype))
    alpha = lc.alpha.numpy().astype(np.float32)
    if b.dequant == "dequantizelinear":
        attrs = {"axis": 0} if lc.per_channel else {}
        return b.node("DequantizeLinear", [codes, b.init(f"{op.name}.alpha", alpha)], f"{op.name}.weight", **attrs)
    if lc.per_channel:  # (C,) -> (C, 1, ...) to broadcast over axis 0
        alpha = alpha.reshape(-1, *([1] * (lc.q.ndim - 1)))
    as_float = b.node("Cast", [codes], f"{op.name}.codes_float", to=TensorProto.FLOAT)
    return b.node("Mul", [as_float, b.init(f"{op.name}.alpha", alpha)], f"{op.name}.weight")


def float_bias(ctx: Ctx, op: Op) -> list[str]:
    m = op.module
    return [ctx.b.init(f"{op.name}.bias", m.bias.detach().numpy().astype(np.float32))] if m.bias is not None else []


def int_weight(ctx: Ctx, op: Op) -> tuple[IntLayer, list[str]]:
    """The integer layout of a quantized linear/conv and its initializers (codes, w_scale,
    w_zero_point, bias_int32), for the input's activation scale."""
    b = ctx.b
    il = integer_layer(op, ctx.layers[op.name], ctx.qp[op.inputs[0]].scale)
    return il, [b.init(f"{op.name}.codes", il.q), b.init(f"{op.name}.w_scale", il.w_scale),
                b.init(f"{op.name}.w_zero_point", np.zeros(il.w_scale.shape, np.int8)),
                b.init(f"{op.name}.bias_int32", il.bias)]


def qname(v: str) -> str:
    """Name of the uint8 tensor holding value v (the float `logits` is the graph output)."""
    from qexport.ops.base import INPUT, OUTPUT
    return {OUTPUT: "logits.q", INPUT: "input.q"}.get(v, v)


class QParamInits:
    """One `<value>.scale` / `<value>.zero_point` initializer pair per quantized value.

    A pass-through op's value (Flatten, MaxPool on uint8) shares its input's parameters
    (`calibrate`), so it reads its source's pair rather than a copy of its own: otherwise the
    source's pair could be left unread (a folded normalisation followed by Flatten, in QOperator
    graphs), and onnxruntime warns at load about initializers no node consumes."""

    def __init__(self, b: Builder, qp: dict, ops: Iterable[Op] = ()):
        from qexport.ops import KINDS

        self.b, self.qp, self.dqs = b, qp, set()
        self.source: dict[str, str] = {}  # pass-through value -> the value whose pair it reads
        for op in ops:
            if KINDS[op.kind].pass_through:
                self.source[op.out] = self.source.get(op.inputs[0], op.inputs[0])

    def __call__(self, v: str) -> list[str]:
        v = self.source.get(v, v)
        s, z = f"{qname(v)}.scale", f"{qname(v)}.zero_point"
        if s not in self.b.names:
            self.b.init(s, np.float32(self.qp[v].scale))
            self.b.init(z, np.uint8(self.qp[v].zero_point))
        return [s, z]

    def dq(self, v: str) -> str:
        """The float DequantizeLinear of value v, built once however many ops read it."""
        out = f"{qname(v)}.dq"
        if out not in self.dqs:
            self.dqs.add(out)
            self.b.node("DequantizeLinear", [qname(v), *self(v)], out)
        return out


def relu_node(b: Builder, op: Op, x: str, out: str) -> str:
    """A folded ReLU: Relu, or Clip(0, max) for a ReLU6."""
    if op.relu_max is None:
        return b.node("Relu", [x], out)
    lo, hi = b.init(f"{out}.clip_min", np.float32(0.0)), b.init(f"{out}.clip_max", np.float32(op.relu_max))
    return b.node("Clip", [x, lo, hi], out)


def bn_node(b: Builder, bn: nn.Module, prefix: str, x: str, out: str) -> str:
    """Eval-mode BatchNormalization with the module's statistics (exact float semantics)."""
    c = bn.num_features
    gamma = bn.weight.detach().numpy() if bn.affine else np.ones(c, np.float32)
    beta = bn.bias.detach().numpy() if bn.affine else np.zeros(c, np.float32)
    ins = [x] + [b.init(f"{prefix}.bn_{k}", np.asarray(v, np.float32)) for k, v in
                 (("gamma", gamma), ("beta", beta), ("mean", bn.running_mean.numpy()), ("var", bn.running_var.numpy()))]
    return b.node("BatchNormalization", ins, out, epsilon=float(bn.eps))


def emit_float_op(ctx, op: Op, ins: list[str], out: str) -> str:
    """The float ONNX nodes of one op and its fused BatchNorm/ReLU, the last one named `out`.
    The whole `weights` form, and the float islands of the integer forms."""
    from qexport.ops import KINDS  # the kinds use this module: imported when called

    post = (["bn"] if op.bn is not None else []) + (["relu"] if op.relu else [])
    y = KINDS[op.kind].onnx(ctx, op, ins, out if not post else f"{out}.core")
    for i, p in enumerate(post):
        name = out if i == len(post) - 1 else f"{out}.{p}_in"
        y = bn_node(ctx.b, op.bn, op.bn_name, y, name) if p == "bn" else relu_node(ctx.b, op, y, name)
    return y
