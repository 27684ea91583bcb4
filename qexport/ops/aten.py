"""Any ATen operator from a fixed allow-list, run in float: the long tail of a torch.export graph
(permute, reshapes, attention, pads, layer scales, ...) that needs no integer kernel.

An op of kind `aten` stores the operator's name (`aten.permute.default`) and its arguments as
JSON: `{"in": i}` is the op's i-th input value, `{"const": j}` its j-th constant tensor (a
parameter or buffer of the user's model at its own name, or a value computed once at capture
under `folded.`), `{"batch": [a, b]}` the integer a·N + b for batch size N (read from input
`batch_from` = [i, dim, k] as shape[dim] // k), `{"dtype": "float32"}` a dtype. Loading a file
resolves the name only against `ALLOWED`; nothing else is looked up or called.

Integer graphs run `aten` as a float island. `aten_move` is the same for operators that only
move values (permute, view, slice, ...): integer graphs apply them to the uint8 value itself,
which keeps its input's scale and zero point.

The float ONNX of each op is what torch.onnx's TorchScript exporter writes for the op alone
(one small module per op, its batch-dependent sizes left symbolic), spliced into qexport's graph:
the translation of every ATen operator stays the PyTorch project's, not one written here.
"""
from __future__ import annotations

import io
import re
import warnings
from typing import Any

import torch
from torch import nn

from qadmm.errors import UserError
from qexport.ops.base import Ctx, Kind, Op, Reshaping

# Operators that only move or select values (exact on uint8, scale and zero point kept).
MOVES = frozenset({
    "aten.permute.default", "aten.transpose.int", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
    "aten.select.int", "aten.slice.Tensor", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
    "aten.squeeze.default", "aten.expand.default", "aten.flatten.using_ints", "aten.unflatten.int", "aten.roll.default",
    "aten.narrow.default", "aten.t.default", "aten.movedim.int", "aten.repeat.default", "aten.pixel_shuffle.default",
    "aten.pixel_unshuffle.default", "aten.channel_shuffle.default", "aten.index_select.default",
    "aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int", "aten.alias.default",
})
# Every operator a stored graph may name (deterministic, no side effects, no I/O).
ALLOWED = MOVES | frozenset({
    "aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar", "aten.rsub.Scalar", "aten.mul.Tensor",
    "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar", "aten.div.Tensor_mode", "aten.neg.default",
    "aten.pow.Tensor_Scalar", "aten.sqrt.default", "aten.rsqrt.default", "aten.exp.default", "aten.log.default",
    "aten.abs.default", "aten.reciprocal.default", "aten.erf.default", "aten.clamp.default", "aten.clamp_min.default",
    "aten.clamp_max.default", "aten.minimum.default", "aten.maximum.default", "aten.where.self",
    "aten.masked_fill.Scalar", "aten.masked_fill.Tensor",
    "aten.relu.default", "aten.gelu.default", "aten.silu.default", "aten.sigmoid.default", "aten.tanh.default",
    "aten.hardswish.default", "aten.hardsigmoid.default", "aten.hardtanh.default", "aten.leaky_relu.default",
    "aten.elu.default", "aten.mish.default", "aten.softplus.default", "aten.relu6.default",
    "aten.softmax.int", "aten.log_softmax.int", "aten._softmax.default",
    "aten.linear.default", "aten.matmul.default", "aten.bmm.default", "aten.mm.default", "aten.addmm.default",
    "aten.baddbmm.default", "aten._native_batch_norm_legit_no_training.default", "aten.einsum.default", "aten.conv1d.default", "aten.conv2d.default",
    "aten.conv_transpose2d.input", "aten.scaled_dot_product_attention.default",
    "aten.layer_norm.default", "aten.group_norm.default", "aten.batch_norm.default", "aten.instance_norm.default",
    "aten.mean.dim", "aten.mean.default", "aten.sum.dim_IntList", "aten.amax.default", "aten.var.correction",
    "aten.std.correction", "aten.max_pool2d.default", "aten.avg_pool2d.default", "aten.adaptive_avg_pool2d.default",
    "aten.adaptive_avg_pool1d.default", "aten.pad.default", "aten.constant_pad_nd.default", "aten.cat.default",
    "aten.stack.default", "aten.upsample_nearest2d.vec", "aten.upsample_bilinear2d.vec", "aten.to.dtype",
    "aten.type_as.default", "aten.norm.ScalarOpt_dim", "aten.linalg_vector_norm.default", "aten.cumsum.default",
})
DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
          "bool": torch.bool, "uint8": torch.uint8}
# Operators taking sizes, called through torch's Python functions with the same meaning: torch.onnx's
# tracer then keeps a size computed from the batch symbolic (through the ATen overload it would be
# a constant). view is reshape: the graph drops `contiguous`, so the values of view, any strides.
SIZED = {
    "aten.view.default": torch.reshape, "aten._unsafe_view.default": torch.reshape, "aten.reshape.default": torch.reshape,
    "aten.expand.default": lambda x, size, implicit=False: x.expand(size),
    "aten.repeat.default": lambda x, repeats: x.repeat(repeats),
    "aten.unflatten.int": torch.unflatten,
    # eval-mode batch norm as timm's BatchNormAct calls it; only its first output is ever read
    "aten._native_batch_norm_legit_no_training.default": lambda x, w, b, mean, var, momentum, eps: (
        torch.nn.functional.batch_norm(x, mean, var, w, b, False, momentum, eps),),
    "aten.slice.Tensor": lambda x, dim=0, start=None, end=None, step=1: x[(slice(None),) * (dim % x.dim()) + (slice(start, end, step),)],
}
FLOAT_ONNX_OPSET = (17, 20)  # float islands are written at the graph's opset within these bounds
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


def resolve(name: str):
    """The ATen overload `name` names, only from `ALLOWED`."""
    if name not in ALLOWED:
        raise ValueError(f"operator {name!r} is not one qexport runs")
    _, op, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, op), overload)


def check_attrs(attrs: dict) -> None:
    """A stored op's attributes are well-formed (ValueError otherwise): an allowed operator, JSON
    arguments of the known forms, constants with safe names, shapes and dtypes."""
    resolve(attrs.get("target", ""))
    consts = attrs.get("consts", [])
    if not isinstance(consts, list):
        raise ValueError("consts")
    for c in consts:
        if not (isinstance(c, list) and len(c) == 3 and isinstance(c[0], str) and _NAME.match(c[0])
                and isinstance(c[1], list) and all(isinstance(s, int) and s >= 0 for s in c[1]) and c[2] in DTYPES):
            raise ValueError(f"constant {c!r}")
    if not isinstance(attrs.get("item", 0), int) or not isinstance(attrs.get("kwargs", {}), dict):
        raise ValueError("item / kwargs")
    bf = attrs.get("batch_from")
    if bf is not None and not (isinstance(bf, list) and len(bf) == 3 and all(isinstance(v, int) and v >= 0 for v in bf) and bf[2] > 0):
        raise ValueError("batch_from")

    def walk(a: Any) -> None:
        if isinstance(a, dict):
            if len(a) != 1 or next(iter(a)) not in ("in", "const", "batch", "dtype"):
                raise ValueError(f"argument {a!r}")
            k, v = next(iter(a.items()))
            ok = {"in": lambda: isinstance(v, int) and v >= 0, "const": lambda: isinstance(v, int) and 0 <= v < len(consts),
                  "batch": lambda: isinstance(v, list) and len(v) == 2 and all(isinstance(t, int) for t in v) and bf is not None,
                  "dtype": lambda: v in DTYPES}[k]()
            if not ok:
                raise ValueError(f"argument {a!r}")
        elif isinstance(a, list):
            for v in a:
                walk(v)
        elif not (a is None or isinstance(a, (bool, int, float, str))):
            raise ValueError(f"argument {a!r}")

    walk(attrs.get("args", []))
    walk(list(attrs.get("kwargs", {}).values()))


def decode(a: Any, xs: list, consts: list, batch: Any) -> Any:
    if isinstance(a, dict):
        k, v = next(iter(a.items()))
        if k == "in":
            return xs[v]
        if k == "const":
            return consts[v]
        if k == "batch":  # no arithmetic when there is none to do: a traced size stays symbolic
            return batch if v == [1, 0] else v[0] * batch + v[1]
        return DTYPES[v]
    if isinstance(a, list):
        return [decode(v, xs, consts, batch) for v in a]
    return a


def call(attrs: dict, xs: list, consts: list) -> torch.Tensor:
    """The operator on inputs `xs` and constants `consts`, sizes that depend on the batch computed
    from the inputs (so a traced call keeps them symbolic)."""
    bf = attrs.get("batch_from")
    batch = None if bf is None else xs[bf[0]].shape[bf[1]] if bf[2] == 1 else xs[bf[0]].shape[bf[1]] // bf[2]
    args = decode(attrs["args"], xs, consts, batch)
    kwargs = {k: decode(v, xs, consts, batch) for k, v in attrs.get("kwargs", {}).items()}
    fn = SIZED.get(attrs["target"]) or resolve(attrs["target"])
    y = fn(*args, **kwargs)
    return y[attrs["item"]] if "item" in attrs else y  # one output of chunk/unbind/split


def pooling_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): row i averages inputs floor(i·n_in/n_out) .. ceil((i+1)·n_in/n_out) - 1, the
    bins of PyTorch's adaptive average pooling. Built from Python numbers, so that a trace records
    it as one constant."""
    rows = []
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        rows.append([1.0 / (hi - lo) if lo <= j < hi else 0.0 for j in range(n_in)])
    return torch.tensor(rows, dtype=torch.float32)


ADAPTIVE_POOLS = {"aten.adaptive_avg_pool2d.default": 2, "aten.adaptive_avg_pool1d.default": 1}


def adaptive_pool_by_matrices(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Adaptive average pooling as products with constant pooling matrices, one per spatial axis:
    what torch.onnx writes for any output size (its own translation takes only sizes that divide
    the input's, so AlexNet's and VGG's 6×6 / 7×7 pools on a small image had no ONNX)."""
    # einsum, not matmul: torch.onnx's trace of a batched matmul reshapes to the example's batch size
    h, w = (int(s) for s in x.shape[-2:])  # spatial sizes are concrete (only the batch is dynamic)
    if len(size) == 2:
        return torch.einsum("nchw,ph,qw->ncpq", x, pooling_matrix(h, size[0]), pooling_matrix(w, size[1]))
    return torch.einsum("ncw,qw->ncq", x, pooling_matrix(w, size[0]))


class _One(nn.Module):
    """One op as a module (its constants as buffers), for torch.onnx to translate."""

    def __init__(self, attrs: dict, consts: list[torch.Tensor]):
        super().__init__()
        self.attrs = attrs
        for j, c in enumerate(consts):
            self.register_buffer(f"c{j}", c.detach().to(torch.float32) if c.is_floating_point() else c.detach())

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        dims = ADAPTIVE_POOLS.get(self.attrs["target"])
        if dims is not None:
            size = self.attrs["args"][1]
            size = [size] * dims if isinstance(size, int) else size
            if any(i % o for i, o in zip(xs[0].shape[-dims:], size)):
                return adaptive_pool_by_matrices(xs[0], size)
        return call(self.attrs, list(xs), [getattr(self, f"c{j}") for j in range(len(self.attrs.get("consts", [])))])


def float_onnx_opset(b) -> int:
    lo, hi = FLOAT_ONNX_OPSET
    return min(hi, max(lo, b.opset or max(b.needed)))


def splice(ctx: Ctx, op: Op, ins: list[str], out: str, dtype: torch.dtype = torch.float32) -> str:
    """torch.onnx's translation of the op (inputs of `dtype`), its names prefixed with `out`."""
    import onnx

    b = ctx.b
    opset = float_onnx_opset(b)
    b.need(opset, f"operator {op.attrs['target']} (written by torch.onnx at opset {opset})")
    examples, dynamic = ctx.examples(op)
    examples = [e.to(dtype) if e.is_floating_point() else e for e in examples]
    names = [f"i{j}" for j in range(len(examples))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(_One(op.attrs, op.consts or []), tuple(examples), buf, dynamo=False, opset_version=opset,
                              input_names=names, output_names=["y"], do_constant_folding=True,
                              dynamic_axes={n: d for n, d in zip(names, dynamic) if d})
        except Exception as e:  # what ONNX cannot express (torch.onnx says why)
            why = " ".join(str(e).split())[:240]
            raise UserError(f"op {op.name} ({op.attrs['target']}) cannot be written as ONNX: torch.onnx: {why}; "
                            "the artifact runs in PyTorch, but change this op to export it") from None
    g = onnx.load_from_string(buf.getvalue()).graph
    rename = {n: v for n, v in zip(names, ins)}
    rename["y"] = out

    def name(v: str) -> str:
        return v if v == "" else rename.setdefault(v, f"{out}.{re.sub(r'[^A-Za-z0-9_.]', '_', v)}")

    for t in g.initializer:
        t = onnx.TensorProto.FromString(t.SerializeToString())
        t.name = name(t.name)
        b.names.add(t.name)
        b.inits.append(t)
    if not g.node:  # the identity: the exporter wrote no node
        return b.node("Identity", [ins[0]], out)
    for n in g.node:
        n = onnx.NodeProto.FromString(n.SerializeToString())
        n.input[:] = [name(v) for v in n.input]
        n.output[:] = [name(v) for v in n.output]
        n.name = n.output[0]
        if n.domain not in ("", "ai.onnx"):
            raise AssertionError(f"torch.onnx wrote {n.domain}::{n.op_type} for {op.attrs['target']}")
        b.nodes.append(n)
    return out


class Aten(Kind):
    name = "aten"

    def check_stored(self, attrs: dict) -> None:
        check_attrs(attrs)

    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return call(op.attrs, xs, op.consts or [])

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        return splice(ctx, op, ins, out)


class AtenMove(Aten, Reshaping):
    name = "aten_move"

    def qoperator(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        splice(ctx, op, ins, out, torch.uint8)
        return True

    def c(self, cg, op: Op) -> bool:
        return False  # it may reorder the bytes (a permute): no C kernel yet


KINDS = [Aten(), AtenMove()]


def const_specs(attrs: dict) -> list[tuple[str, list[int], torch.dtype]]:
    return [(n, s, DTYPES[d]) for n, s, d in attrs.get("consts", [])]


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"dtype {dtype}")

