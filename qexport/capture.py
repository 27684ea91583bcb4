"""A model torch.fx cannot trace, captured with torch.export into the same `Graph`.

`torch.export.export(model, (x,), dynamic_shapes=batch, strict=False)` runs the model's Python
once with symbolic shapes: shape arithmetic (`x.shape[1] // groups`, patch reshapes), control
flow on shapes and optional arguments all become constants, and the result is a graph of ATen
operators (functionalized, so in-place ops are plain ones). It is read into ops as follows:

- the operators inside a module of a registered kind (a Conv2d, Linear, BatchNorm, LayerNorm,
  ReLU, the normalisation, ...) become that kind's op, named by the module's qualified name, so
  quantized layers keep the user's names and integer kernels;
- a few functions map to registered kinds (relu, add and mul of two values, cat, pools, mean,
  flatten, softmax and the activations) where the inputs hold the batch in axis 0;
- whatever depends only on parameters and constants is computed once here (`folded.<node>`);
- every other allowed ATen operator is an `aten` / `aten_move` op (`qexport/ops/aten.py`): it
  runs in float in every form (a float island in the integer graphs), never a refusal.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qadmm.errors import UserError
from qexport.ops import IDENTITY_MODULES, KINDS, kind_of_call, kind_of_module
from qexport.ops.aten import ALLOWED, MOVES, dtype_name
from qexport.ops.base import INPUT, OUTPUT, Op, Unsupported

if TYPE_CHECKING:
    from qexport.graph import Graph

aten = torch.ops.aten
# ATen operators that are registered kinds' functions (the kind reads the same arguments).
FUNCTIONS = {
    aten.relu.default: torch.relu, aten.add.Tensor: operator.add, aten.mul.Tensor: operator.mul, aten.cat.default: torch.cat,
    aten.max_pool2d.default: F.max_pool2d, aten.avg_pool2d.default: F.avg_pool2d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d, aten.mean.dim: torch.mean, aten.softmax.int: torch.softmax,
    aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh, aten.silu.default: F.silu, aten.gelu.default: F.gelu,
    aten.hardswish.default: F.hardswish, aten.hardsigmoid.default: F.hardsigmoid, aten.hardtanh.default: F.hardtanh,
    aten.leaky_relu.default: F.leaky_relu,
}
IDENTITIES = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
              aten.lift_fresh_copy.default}
NEW = {aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.new_empty.default}


@dataclass
class Val:
    """A value of the graph (a tensor that depends on the input)."""
    name: str


@dataclass
class Const:
    """A tensor that does not depend on the input: a parameter/buffer (its name) or folded."""
    tensor: torch.Tensor
    name: str


@dataclass
class Sym:
    """An integer a·N + b of the batch size N."""
    a: int
    b: int


class Internal:
    """A value inside a module captured as one op: nothing outside it may read it."""


def _linear(v: Any, batch: Any) -> Sym | int:
    """A SymInt as a·N + b, or the int it is."""
    import sympy

    if not isinstance(v, torch.SymInt):
        return int(v)
    e = sympy.expand(v.node.expr)
    if e.free_symbols - {batch}:
        raise Unsupported(f"a size {e} that is not linear in the batch size")
    a, b = e.coeff(batch), e.subs(batch, 0)
    if not (a.is_integer and b.is_integer) or sympy.expand(a * batch + b - e) != 0:
        raise Unsupported(f"a size {e} that is not linear in the batch size")
    return Sym(int(a), int(b)) if a != 0 else int(b)


def export(model: nn.Module, input_shape: tuple[int, ...] | list[int]):
    x = torch.zeros(2, *input_shape)  # a batch of 2: export specialises sizes 0 and 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
            return ep.run_decompositions({})
        except Exception as e:
            msg = " ".join(str(e).strip().split("\n")[0].split())[:300]
            raise UserError(f"cannot capture {type(model).__name__} with torch.export ({type(e).__name__}: {msg}): qexport "
                            "needs a model that torch.export.export(model, (x,), strict=False) can export") from None


def capture(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> Graph:
    """The model as a `Graph` (see the module docstring); a UserError naming what torch.export or
    the capture cannot take."""
    from qexport.graph import Graph, bind

    was_training = model.training
    model.eval()
    try:
        ep = export(model, input_shape)
    finally:
        model.train(was_training)
    g = ep.graph
    by_name = {n.name: n for n in g.nodes}
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    state = {**ep.state_dict, **ep.constants}
    modules = dict(model.named_modules())
    env: dict[str, Any] = {}
    ops: list[Op] = []
    shapes: dict[str, list[int]] = {INPUT: list(input_shape)}
    constants: dict[str, torch.Tensor] = {}
    renames: dict[str, str] = {}  # a Linear made of raw parameters: its weight/bias -> the user's names
    batch = None

    def refuse(node, what: str) -> UserError:
        from qexport.graph import _where

        where = _where(node)
        return UserError(f"cannot capture {type(model).__name__}: {what}{where}")

    # -- which nodes lie inside a module of a registered kind (captured as one op) -----------------
    groups: dict[str, list] = {}  # nn_module_stack key -> nodes
    group_of: dict[str, str] = {}
    for node in g.nodes:
        if node.op != "call_function":
            continue
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            m = modules.get(path)
            if m is not None and path and (kind_of_module(m) is not None or isinstance(m, IDENTITY_MODULES)):
                groups.setdefault(key, []).append(node)
                group_of[node.name] = key
                break
    done: set[str] = set()

    def shape_of(node) -> list[int]:
        val = node.meta["val"]
        return [int(d) if not isinstance(d, torch.SymInt) else -1 for d in val.shape[1:]]

    def batch_leading(node) -> bool:
        val = node.meta.get("val")
        return isinstance(val, torch.Tensor) and val.dim() >= 1 and isinstance(val.shape[0], torch.SymInt) \
            and _linear(val.shape[0], batch) == Sym(1, 0) and not any(isinstance(d, torch.SymInt) for d in val.shape[1:])

    def add(kind_name: str, name: str, ins: list[str], out: str, attrs: dict, node) -> None:
        ops.append(Op(kind_name, name, ins, out, attrs))
        shapes[out] = shape_of(node)
        env[out] = Val(out)

    def module_op(key: str, node) -> bool:
        """The group's module as one op; False: it cannot be (its nodes are then read one by one)."""
        nodes = groups[key]
        path = node.meta["nn_module_stack"][key][0]
        m = modules[path]
        names = {n.name for n in nodes}
        last = nodes[-1]
        outside = [u for n in nodes[:-1] for u in n.users if u.name not in names]
        ext = []
        for n in nodes:
            for a in _flat(n.args) + _flat(list(n.kwargs.values())):
                if isinstance(a, torch.fx.Node) and a.name not in names and isinstance(env.get(a.name), Val) \
                        and env[a.name].name not in ext:
                    ext.append(env[a.name].name)
        if outside or len(ext) != 1 or not isinstance(last.meta.get("val"), torch.Tensor):
            return False
        if isinstance(m, IDENTITY_MODULES):
            for n in nodes:
                env[n.name] = Internal()
            env[last.name] = Val(ext[0])
            return True
        kind = kind_of_module(m)
        if not batch_leading(last) or (ext[0] != INPUT and not batch_leading(by_name.get(ext[0]))):
            if kind.name not in ("linear", "layernorm"):
                return False
        try:
            attrs = kind.from_module(m)
            kind.check(attrs, [shapes[ext[0]]])
        except Unsupported:
            return False
        for n in nodes:
            env[n.name] = Internal()
        add(kind.name, path, ext, last.name, attrs, last)
        return True

    def real(a: Any) -> Any:
        """Arguments with constants as tensors (for folding); None when something is not constant."""
        if isinstance(a, torch.fx.Node):
            v = env[a.name]
            if isinstance(v, Const):
                return v.tensor
            if isinstance(v, (int, float, bool)) or v is None:
                return v
            if isinstance(v, list) and all(isinstance(t, Const) for t in v):
                return [t.tensor for t in v]
            raise _NotConst
        if isinstance(a, (list, tuple)):
            return type(a)(real(v) for v in a)
        return a

    def generic(node, item: int | None = None, out: str | None = None) -> None:
        target = f"aten.{node.target._opname}.{node.target._overloadname}" if hasattr(node.target, "_opname") else str(node.target)
        if target not in ALLOWED:
            raise refuse(node, f"operator {target} is not one qexport runs")
        ins: list[str] = []
        consts: list[list] = []
        syms = []

        def enc(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                v = env[a.name]
                if isinstance(v, Internal):
                    raise refuse(node, f"{a.name}, a value inside a module, is read outside it")
                a = v
            if isinstance(a, Val):
                if a.name not in ins:
                    ins.append(a.name)
                return {"in": ins.index(a.name)}
            if isinstance(a, Const):
                if a.name not in [c[0] for c in consts]:
                    consts.append([a.name, list(a.tensor.shape), dtype_name(a.tensor.dtype)])
                    if a.name.startswith("folded."):
                        constants[a.name] = a.tensor
                return {"const": [c[0] for c in consts].index(a.name)}
            if isinstance(a, Sym):
                syms.append(a)
                return {"batch": [a.a, a.b]}
            if isinstance(a, (list, tuple)):
                return [enc(v) for v in a]
            if isinstance(a, torch.dtype):
                return {"dtype": dtype_name(a)}
            if a is None or isinstance(a, (bool, int, float, str)):
                return a
            raise refuse(node, f"operator {target} with an argument {a!r}")

        args = enc(list(node.args))
        kwargs = {k: enc(v) for k, v in node.kwargs.items() if k not in ("device", "layout", "pin_memory")}
        attrs: dict[str, Any] = {"target": target, "args": args}
        if kwargs:
            attrs["kwargs"] = kwargs
        if consts:
            attrs["consts"] = consts
        if item is not None:
            attrs["item"] = item
        if syms:
            attrs["batch_from"] = _batch_source(by_name, ins, batch)
            if attrs["batch_from"] is None:
                ins.append(INPUT)
                attrs["batch_from"] = [len(ins) - 1, 0, 1]
        if not ins:
            ins.append(INPUT)  # a value computed from nothing but sizes: it still runs per batch
        moves = target in MOVES and args and args[0] == {"in": 0}
        out = out or node.name
        src = node if item is None else by_name.get(out)
        add("aten_move" if moves else "aten", out, ins, out, attrs, src)

    output = None
    for node in g.nodes:
        if node.op == "placeholder":
            spec = specs[node.name]
            kind = spec.kind.name
            if kind in ("PARAMETER", "BUFFER"):
                env[node.name] = Const(state[spec.target], spec.target)
            elif kind == "CONSTANT_TENSOR":
                env[node.name] = Const(state[spec.target], f"folded.{node.name}")
            elif kind == "USER_INPUT":
                if batch is not None:
                    raise UserError("the model takes more than one tensor input: qexport supports single-input models")
                val = node.meta["val"]
                if not isinstance(val.shape[0], torch.SymInt):
                    raise UserError(f"{type(model).__name__} fixes its batch size at export (a size computed from the "
                                    "batch is used as a constant): qexport exports models that take any batch size")
                batch = val.shape[0].node.expr
                env[node.name] = Val(INPUT)
            else:
                raise refuse(node, f"an input of kind {kind}")
            continue
        if node.op == "output":
            outs = node.args[0]
            if len(outs) != 1:
                raise UserError(f"{type(model).__name__} returns {len(outs)} values: qexport supports one output tensor")
            v = env[outs[0].name] if isinstance(outs[0], torch.fx.Node) else None
            if not isinstance(v, Val) or v.name == INPUT:
                raise UserError(f"{type(model).__name__} returns a constant or its input unchanged: nothing to quantize")
            if not batch_leading(outs[0]) and outs[0].op != "placeholder":
                raise UserError(f"{type(model).__name__} returns shape {tuple(outs[0].meta['val'].shape)}: qexport needs "
                                "the batch in the output's first axis")
            output = v.name
            continue
        if node.op != "call_function":
            raise refuse(node, f"a graph node of kind {node.op}")
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            try:
                env[node.name] = _linear(val, batch)
            except Unsupported as e:
                raise refuse(node, str(e)) from None
            continue
        if node.target in (torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default,
                           torch.ops.aten._assert_tensor_metadata.default):
            continue
        key = group_of.get(node.name)
        if key is not None and key not in done:
            done.add(key)
            if not module_op(key, node):
                for n in groups[key]:
                    group_of.pop(n.name, None)
        if key is not None and group_of.get(node.name) == key:
            continue
        if node.target is operator.getitem:
            src, i = node.args
            v = env[src.name]
            if isinstance(v, list):
                env[node.name] = v[i]
            elif isinstance(v, tuple) and v[0] == "multi":
                if not (i == 0 and _module_batchnorm(v[1], node, env, modules, add)):
                    generic(v[1], item=i, out=node.name)
            else:
                raise refuse(node, f"an item of {src.name}")
            continue
        # constant folding: every tensor argument constant (sizes fixed)
        try:
            if node.target in NEW:  # only the dtype of `self` matters
                args = (torch.empty(0, dtype=node.args[0].meta["val"].dtype), *real(tuple(node.args[1:])))
            else:
                args = real(tuple(node.args))
            kwargs = real(dict(node.kwargs))
            if any(isinstance(a, Sym) for a in _flat(list(args) + list(kwargs.values()))):
                raise _NotConst
            with torch.no_grad():
                res = node.target(*args, **kwargs)
            if isinstance(res, torch.Tensor):
                env[node.name] = Const(res.detach(), f"folded.{node.name}")
            elif isinstance(res, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in res):
                env[node.name] = [Const(t.detach(), f"folded.{node.name}_{j}") for j, t in enumerate(res)]
            else:
                env[node.name] = res
            continue
        except _NotConst:
            pass
        if node.target in IDENTITIES or node.target is aten.dropout.default and not _arg(node, 2, "train", True):
            env[node.name] = env[node.args[0].name]
            continue
        if isinstance(val, (tuple, list)):
            env[node.name] = ("multi", node)
            continue
        if node.target is aten.linear.default and _module_linear(node, env, modules, add, renames, {op.name for op in ops}):
            continue
        fn = FUNCTIONS.get(node.target)
        if fn is not None and _kind_call(fn, node, env, batch_leading, add):
            continue
        generic(node)
    if output is None or not ops:
        raise UserError(f"{type(model).__name__} has no layers to export")
    for op in ops:  # every form's graph output is called `logits`
        op.inputs = [OUTPUT if i == output else i for i in op.inputs]
        if op.out == output:
            op.out = OUTPUT
    shapes[OUTPUT] = shapes.pop(output)
    return bind(Graph(ops, list(input_shape), shapes, constants, "torch.export", renames), model)


class _NotConst(Exception):
    pass


def _kind_call(fn, node, env: dict, batch_leading, add) -> bool:
    """A call of a registered kind's function on values that hold the batch in axis 0."""
    kind = kind_of_call(fn, False)
    tensors = [a for a in _flat(list(node.args)) if isinstance(a, torch.fx.Node) and isinstance(env[a.name], (Val, Const))]
    if kind is None or not all(isinstance(env[a.name], Val) for a in tensors) or not all(
            env[a.name].name == INPUT or batch_leading(a) for a in tensors) or not batch_leading(node):
        return False

    def value(a):
        if isinstance(a, torch.fx.Node):
            v = env[a.name]
            return v.name if isinstance(v, Val) else v
        if isinstance(a, (list, tuple)):
            return type(a)(value(v) for v in a)
        return a

    args = value(tuple(node.args))
    if fn in (F.max_pool2d, F.avg_pool2d) and len(args) > 2 and args[2] == []:
        args = (*args[:2], args[1], *args[3:])  # ATen's empty stride is the kernel size
    try:
        ins, attrs = kind.from_call(fn, args, value(dict(node.kwargs)))
        if any(not isinstance(i, str) for i in ins):
            return False
        kind.check(attrs, [[-1] if i is None else _shape(env, i, node) for i in ins])
    except Unsupported:
        return False
    add(kind.name, node.name, list(ins), node.name, attrs, node)
    return True


def _module_linear(node, env: dict, modules: dict, add, renames: dict, names: set) -> bool:
    """F.linear(x, P.weight, P.bias) of a Linear module P that is not called itself (attention's
    output projection): the Linear layer P, quantized like any other. F.linear on parameters of no
    Linear (nn.MultiheadAttention's packed `in_proj_weight`): a Linear layer named after the weight
    (`...in_proj`), its weight and bias read from the user's parameters (`renames`)."""
    x, w, b = (list(node.args) + [None])[:3]
    wv, bv = env.get(w.name), env.get(b.name) if isinstance(b, torch.fx.Node) else None
    if not (isinstance(env.get(x.name), Val) and isinstance(wv, Const) and not wv.name.startswith("folded.")
            and wv.tensor.dim() == 2 and wv.tensor.is_floating_point()):
        return False
    if not wv.name.endswith(".weight"):
        if b is not None and not (isinstance(bv, Const) and not bv.name.startswith("folded.") and bv.tensor.shape == wv.tensor.shape[:1]):
            return False
        path = wv.name[:-len("_weight")] if wv.name.endswith("_weight") else f"{wv.name}_linear"
        if path in modules or path in names or f"{path}.weight" in renames:
            return False
        renames[f"{path}.weight"] = wv.name
        if b is not None:
            renames[f"{path}.bias"] = bv.name
        attrs = {"in_features": int(wv.tensor.shape[1]), "out_features": int(wv.tensor.shape[0]), "bias": b is not None}
        add("linear", path, [env[x.name].name], node.name, attrs, node)
        return True
    path = wv.name[:-len(".weight")]
    m = modules.get(path)
    if not isinstance(m, nn.Linear) or (m.bias is None) != (b is None) or (b is not None and not (
            isinstance(bv, Const) and bv.name == f"{path}.bias")):
        return False
    attrs = KINDS["linear"].from_module(m)
    add("linear", path, [env[x.name].name], node.name, attrs, node)
    return True


def _module_batchnorm(bn_node, out_node, env: dict, modules: dict, add) -> bool:
    """Eval-mode batch norm on the parameters of a BatchNorm subclass P (timm's BatchNormAct2d,
    whose forward adds the activation): the BatchNorm op P, which folds into the conv before it."""
    if bn_node.target is not aten._native_batch_norm_legit_no_training.default:
        return False
    x, w, b, mean, var = bn_node.args[:5]
    vals = [env.get(a.name) if isinstance(a, torch.fx.Node) else None for a in (w, b, mean, var)]
    if not isinstance(env.get(x.name), Val) or not isinstance(vals[2], Const) or not vals[2].name.endswith(".running_mean"):
        return False
    path = vals[2].name[:-len(".running_mean")]
    m = modules.get(path)
    want = [f"{path}.weight", f"{path}.bias", f"{path}.running_mean", f"{path}.running_var"]
    if not isinstance(m, nn.BatchNorm2d) or not m.track_running_stats or float(bn_node.args[6]) != m.eps \
            or [v.name if isinstance(v, Const) else None for v in vals] != (want if m.affine else [None, None, *want[2:]]):
        return False
    attrs = {"dim": 2, "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine}
    add("batchnorm", path, [env[x.name].name], out_node.name, attrs, out_node)
    return True


def _shape(env, name, node):
    for a in _flat(list(node.args)):
        if isinstance(a, torch.fx.Node) and isinstance(env.get(a.name), Val) and env[a.name].name == name:
            return [int(d) for d in a.meta["val"].shape[1:]]
    raise Unsupported("input shape")


def _batch_source(by_name: dict, ins: list[str], batch) -> list[int] | None:
    """[input index, axis, k] of an input whose size along axis is k·N."""
    for i, name in enumerate(ins):
        if name == INPUT:
            return [i, 0, 1]
        node = by_name.get(name)
        for d, s in enumerate(node.meta["val"].shape if node is not None else []):
            if isinstance(s, torch.SymInt):
                try:
                    v = _linear(s, batch)
                except Unsupported:
                    continue
                if isinstance(v, Sym) and v.a > 0 and v.b == 0:
                    return [i, d, v.a]
    return None


def _flat(a: Any) -> list:
    if isinstance(a, (list, tuple)):
        return [x for v in a for x in _flat(v)]
    return [a]


def _arg(node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


