"""What every ONNX form shares: the model traced with torch.fx into a short list of supported ops,
a float evaluator over that list (calibration and the `weights` reference), BatchNorm folding,
and the graph-building helpers (initializers, normalisation nodes, metadata, dynamic batch).

The three emitters (`onnx_weights`, `onnx_qdq`, `onnx_qoperator`) walk the same `Op` list, so a
layer supported by one form is supported by all, and a layer that is not gets one error naming it.
"""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from qadmm.errors import UserError
from qadmm.zoo import Normalize

INPUT = "input"
OUTPUT = "logits"
MS_DOMAIN = "com.microsoft"


@dataclass
class Op:
    """One node of the traced model after fusion.

    kind: normalize | linear | conv | bn | relu | add | flatten | maxpool | avgpool | gap.
    `out` is the name of the value it produces (also its ONNX tensor name); `bn` is a BatchNorm
    folded after a linear/conv; `relu` a ReLU folded after a linear/conv/add.
    """

    kind: str
    name: str
    inputs: list[str]
    out: str
    module: nn.Module | None = None
    bn: nn.Module | None = None
    relu: bool = False


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


_MODULE_KINDS = ((Normalize, "normalize"), (nn.Linear, "linear"), (nn.Conv2d, "conv"), (nn.BatchNorm1d, "bn"),
                 (nn.BatchNorm2d, "bn"), (nn.ReLU, "relu"), (nn.Flatten, "flatten"), (nn.MaxPool2d, "maxpool"),
                 (nn.AvgPool2d, "avgpool"), (nn.AdaptiveAvgPool2d, "gap"))
SUPPORTED = "Linear, Conv2d, BatchNorm1d/2d, ReLU, residual add, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Identity, Dropout"


def _unsupported(what: str) -> UserError:
    return UserError(f"unsupported layer {what}: ONNX export supports {SUPPORTED}")


def _check_module(name: str, m: nn.Module, kind: str) -> None:
    if kind == "conv" and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        raise _unsupported(f"{name} (Conv2d with padding={m.padding!r}, padding_mode={m.padding_mode!r}; use integer zero padding)")
    if kind == "flatten" and (m.start_dim != 1 or m.end_dim != -1):
        raise _unsupported(f"{name} (Flatten(start_dim={m.start_dim}, end_dim={m.end_dim}); only Flatten(1, -1))")
    if kind == "gap" and m.output_size not in (1, (1, 1)):
        raise _unsupported(f"{name} (AdaptiveAvgPool2d({m.output_size}); only output size 1)")
    if kind in ("maxpool", "avgpool") and getattr(m, "return_indices", False):
        raise _unsupported(f"{name} (MaxPool2d with return_indices)")
    if kind == "avgpool" and m.divisor_override is not None:
        raise _unsupported(f"{name} (AvgPool2d with divisor_override)")
    if kind == "bn" and not m.track_running_stats:
        raise _unsupported(f"{name} (BatchNorm without running statistics)")


def trace(model: nn.Module) -> list[Op]:
    """The model as a list of `Op`s in execution order, with BatchNorm and ReLU fused into the
    layer before them where that layer is their only producer and they its only consumer."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow, unsupported Python in forward
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx ({str(e).splitlines()[0]}): "
                        f"export needs a forward made of {SUPPORTED}") from None
    modules = dict(model.named_modules())
    alias: dict[str, str] = {}  # value -> value it is identical to (Identity, Dropout)
    ops: list[Op] = []
    output: str | None = None

    def val(a: Any, where: str) -> str:
        if not isinstance(a, fx.Node):
            raise _unsupported(f"{where} (a constant {a!r} as a tensor operand)")
        return alias.get(a.name, a.name)

    for node in graph.nodes:
        if node.op == "placeholder":
            if any(o.kind == "input" for o in ops) or alias:
                raise UserError("the model takes more than one input: export supports single-input classifiers")
            alias[node.name] = INPUT
        elif node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, (nn.Identity, nn.Dropout)):
                alias[node.name] = val(node.args[0], node.target)
                continue
            kind = next((k for t, k in _MODULE_KINDS if type(m) is t), None)
            if kind is None:
                raise _unsupported(f"{node.target} ({type(m).__name__})")
            _check_module(node.target, m, kind)
            ops.append(Op(kind, node.target, [val(node.args[0], node.target)], node.name, m))
        elif node.op == "call_function":
            fn, where = node.target, f"{node.name} ({getattr(node.target, '__name__', node.target)})"
            if fn in (operator.add, torch.add, operator.iadd) and len(node.args) == 2 and not node.kwargs:
                ops.append(Op("add", node.name, [val(a, where) for a in node.args], node.name))
            elif fn in (torch.relu, F.relu) and not node.kwargs.get("inplace", False) or fn is torch.relu_:
                ops.append(Op("relu", node.name, [val(node.args[0], where)], node.name))
            elif fn is torch.flatten and tuple(node.args[1:]) in ((1,), (1, -1)) and not node.kwargs:
                ops.append(Op("flatten", node.name, [val(node.args[0], where)], node.name))
            else:
                raise _unsupported(where)
        elif node.op == "call_method":
            where = f"{node.name} (Tensor.{node.target})"
            if node.target in ("relu", "relu_"):
                ops.append(Op("relu", node.name, [val(node.args[0], where)], node.name))
            elif node.target == "flatten" and tuple(node.args[1:]) in ((1,), (1, -1)):
                ops.append(Op("flatten", node.name, [val(node.args[0], where)], node.name))
            else:
                raise _unsupported(where)
        elif node.op == "output":
            output = val(node.args[0], "output")
        else:  # get_attr: a parameter used directly in forward
            raise _unsupported(f"{node.name} ({node.op} {node.target})")
    if output is None or not ops:
        raise UserError("the model has no layers to export")
    if output == INPUT:
        raise UserError("the model returns its input unchanged: nothing to export")
    ops = _fuse(ops, output)
    # Name the final value OUTPUT so every form's graph output is called `logits`.
    for op in ops:
        op.inputs = [OUTPUT if i == output else i for i in op.inputs]
        if op.out == output:
            op.out = OUTPUT
    return ops


def _fuse(ops: list[Op], output: str) -> list[Op]:
    uses: dict[str, int] = {output: 1}
    for op in ops:
        for i in op.inputs:
            uses[i] = uses.get(i, 0) + 1
    fused: list[Op] = []
    for op in ops:
        prev = fused[-1] if fused else None
        single = prev is not None and op.inputs == [prev.out] and uses.get(prev.out, 0) == 1
        if single and op.kind == "bn" and prev.kind in ("linear", "conv") and prev.bn is None and not prev.relu:
            prev.bn, prev.out = op.module, op.out
        elif single and op.kind == "relu" and prev.kind in ("linear", "conv", "add") and not prev.relu:
            prev.relu, prev.out = True, op.out
        else:
            fused.append(op)
    return fused


# ---------------------------------------------------------------------------------------------
# Float evaluation of the op list (PyTorch): calibration statistics and the `weights` reference.

def apply_op(op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
    """The float function of one op, exactly as the PyTorch modules compute it."""
    x = xs[0]
    if op.kind in ("normalize", "linear", "conv", "maxpool", "avgpool", "gap", "bn"):
        y = op.module(x)
    elif op.kind == "add":
        y = xs[0] + xs[1]
    elif op.kind == "relu":
        y = torch.relu(x)
    elif op.kind == "flatten":
        y = torch.flatten(x, 1)
    else:
        raise AssertionError(op.kind)
    if op.bn is not None:
        y = op.bn(y)
    if op.relu:
        y = torch.relu(y)
    return y


@torch.no_grad()
def evaluate(ops: list[Op], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every op's float output for input x (eval-mode modules)."""
    vals = {INPUT: x}
    for op in ops:
        vals[op.out] = apply_op(op, [vals[i] for i in op.inputs])
    return vals


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

@dataclass
class Builder:
    """Accumulates nodes and initializers; names are the caller's, checked for uniqueness."""

    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    names: set = field(default_factory=set)
    uses_int2: bool = False
    uses_ms: bool = False

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


def normalize_nodes(b: Builder, op: Op, x: str) -> str:
    """(x - mean) / std with the artifact's statistics: users feed raw features."""
    mean = op.module.mean.numpy().astype(np.float32)
    std = op.module.std.numpy().astype(np.float32)
    b.node("Sub", [x, b.init(f"{op.name}.mean", mean)], f"{op.out}.centered")
    return b.node("Div", [f"{op.out}.centered", b.init(f"{op.name}.std", std)], f"{op.out}.float")


def conv_attrs(m: nn.Conv2d) -> dict:
    ph, pw = m.padding
    return {"kernel_shape": list(m.kernel_size), "strides": list(m.stride), "pads": [ph, pw, ph, pw],
            "dilations": list(m.dilation), "group": m.groups}


def pool_attrs(m: nn.Module) -> dict:
    def pair(v):
        return [v, v] if isinstance(v, int) else list(v)

    k = pair(m.kernel_size)
    s = pair(m.stride if m.stride is not None else m.kernel_size)
    p = pair(m.padding)
    attrs = {"kernel_shape": k, "strides": s, "pads": [p[0], p[1], p[0], p[1]], "ceil_mode": int(m.ceil_mode)}
    if isinstance(m, nn.MaxPool2d):
        attrs["dilations"] = pair(m.dilation)
    else:
        attrs["count_include_pad"] = int(m.count_include_pad)
    return attrs


def metadata(art, form: str, extra: dict | None = None) -> dict[str, str]:
    """metadata_props: what produced the file (bits, scheme, method, source artifact, versions)."""
    import qexport

    sets = sorted({(lc.codes.scheme, lc.codes.bits) for lc in art.layers.values()})
    spec = art.meta.get("spec", {})
    meta = {
        "qexport.form": form,
        "qexport.version": qexport.__version__,
        "qexport.bits": ",".join(str(b) for _, b in sets) or "float",
        "qexport.scheme": ",".join(s for s, _ in sets) or "float",
        "qexport.per_channel": str(bool(spec.get("per_channel", False))).lower(),
        "qexport.method": art.meta.get("method", {}).get("name", "unknown"),
        "qexport.method_params": json.dumps(art.meta.get("method", {}).get("params", {}), sort_keys=True),
        "qexport.artifact_sha256": art.sha256,
        "qexport.model": art.meta.get("architecture", {}).get("model", ""),
        "qexport.dataset": json.dumps(art.meta.get("dataset", {}), sort_keys=True),
        "qexport.seed": str(spec.get("seed", "")),
        "qexport.layers": json.dumps(art.meta.get("layers", {}), sort_keys=True),
    }
    for k, v in (extra or {}).items():
        meta[f"qexport.{k}"] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return meta


def finish(b: Builder, input_shape: tuple[int, ...], num_classes: int, meta: dict[str, str], out_type: int | None = None):
    """The checked ModelProto: dynamic batch axis `batch`, opset 21 (25 when INT2 is used),
    com.microsoft when used, metadata_props, `check_model(full_check=True)`."""
    import onnx
    from onnx import TensorProto, helper

    import qexport

    graph = helper.make_graph(
        b.nodes, "qexport",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info(OUTPUT, out_type or TensorProto.FLOAT, ["batch", num_classes])],
        b.inits,
    )
    opsets = [helper.make_opsetid("", 25 if b.uses_int2 else 21)]
    if b.uses_ms:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="qexport", producer_version=qexport.__version__)
    model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    helper.set_model_props(model, meta)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug in an emitter, not user input
        raise AssertionError(f"qexport built an invalid ONNX graph: {e}") from e
    return model


def read_metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
