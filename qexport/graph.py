"""The model as qexport stores and exports it: a list of `Op`s traced with torch.fx.

`trace(model, input_shape)` reads a user's `nn.Module` (any code torch.fx can trace:
`x.view(x.size(0), -1)`, functional calls, residual adds) into ops of the kinds registered in
`qexport.ops`, refusing the first op no kind matches with its name and its line in the user's
code. The `Graph` is plain JSON (kinds, attributes, parameter names) and is saved in every artifact;
`GraphModel(graph)` rebuilds a runnable `nn.Module` from it, with the same parameter names as the
user's model, so every later command works from the file alone: no user code is ever imported.
"""
from __future__ import annotations

import copy
import operator
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qadmm.errors import BadFile, UserError
from qadmm.recalibrate import BATCHNORMS
from qexport.ops import IDENTITY_FUNCTIONS, IDENTITY_METHODS, IDENTITY_MODULES, KINDS, is_identity_call, kind_of_call, \
    kind_of_module
from qexport.ops.aten import const_specs
from qexport.ops.base import INPUT, OUTPUT, Op, Unsupported

BATCH = "batch"  # marks x.size(0) / x.shape[0] in a traced call's arguments
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


@dataclass
class Graph:
    ops: list[Op]
    input_shape: list[int]
    shapes: dict[str, list[int]] = field(default_factory=dict)  # value -> shape without the batch axis
    # tensors a torch.export capture computed once (`folded.<node>`), saved with the model's own
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = "torch.fx"  # what captured it: "torch.fx" or "torch.export" (`qexport.capture`)
    # a Linear op a capture made of raw parameters: its state name -> the user's parameter (`rebuilt`)
    renames: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ops": [op.to_json() for op in self.ops], "input_shape": list(self.input_shape),
                "shapes": {k: list(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "Graph":
        """A graph read from a file, checked: known kinds, safe names, every input defined before use."""
        def bad(msg: str) -> BadFile:
            return BadFile(f"{where}: invalid model graph ({msg}); the file is corrupted or was edited")

        if not isinstance(d, dict) or not isinstance(d.get("ops"), list) or not d["ops"]:
            raise bad("no ops")
        shape = d.get("input_shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise bad(f"input shape {shape!r}")
        defined, ops = {INPUT}, []
        for o in d["ops"]:
            if not isinstance(o, dict) or o.get("kind") not in KINDS:
                raise bad(f"unknown op kind {o.get('kind') if isinstance(o, dict) else o!r}")
            name, out, ins = o.get("name"), o.get("out"), o.get("inputs")
            if not (isinstance(name, str) and _NAME.match(name) and isinstance(out, str) and _NAME.match(out)):
                raise bad(f"op name {name!r} / value {out!r}")
            if not isinstance(ins, list) or not ins or any(i not in defined for i in ins):
                raise bad(f"op {name} reads {ins!r} before they are computed")
            if not isinstance(o.get("attrs", {}), dict):
                raise bad(f"op {name} attributes")
            try:
                KINDS[o["kind"]].check_stored(o.get("attrs", {}))
            except (ValueError, TypeError, AttributeError) as e:
                raise bad(f"op {name}: {e}") from None
            defined.add(out)
            ops.append(Op(o["kind"], name, list(ins), out, dict(o.get("attrs", {}))))
        if OUTPUT not in defined:
            raise bad("no output")
        shapes = d.get("shapes", {})
        return cls(ops, shape, {k: list(v) for k, v in shapes.items()} if isinstance(shapes, dict) else {})


# ---------------------------------------------------------------------------------------------
# Tracing a user's model.

class ModelFails(UserError):
    """The model raises on an input of the data's shape (a mismatch of model and data)."""


class _Tracer(fx.Tracer):
    """Leaf modules are the registered kinds (and Dropout/Identity); everything else is traced
    through, so a user's own blocks become the ops they are made of. With `where`, each node
    records the stack that made it, for a refusal to name the line of the user's code."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.record_stack_traces = where

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return kind_of_module(m) is not None or isinstance(m, IDENTITY_MODULES) or super().is_leaf_module(m, qualname)


def _where(node: fx.Node) -> str:
    """`file.py:LINE` of the user's code that made this node (from fx's recorded stack)."""
    lines = [ln for ln in (node.stack_trace or "").splitlines()
             if ln.strip().startswith("File ") and "/torch/" not in ln and "/qexport/" not in ln]
    if not lines:
        return ""
    m = re.search(r'File "([^"]+)", line (\d+)', lines[-1])
    return f" at {m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}" if m else ""


def _fn_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def trace(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> Graph:
    """The model as a `Graph`: traced with torch.fx into registered op kinds, or, where fx cannot
    (shape arithmetic, control flow, an op without a kind), captured with torch.export
    (`qexport.capture`); a UserError naming what neither can take (before any quantization work)."""
    try:
        return fx_trace(model, input_shape)
    except ModelFails:  # the model itself does not run on this input: no capture can help
        raise
    except UserError as fx_error:
        from qexport.capture import capture

        try:
            return capture(model, input_shape)
        except UserError as e:
            raise UserError(f"{e} (torch.fx: {fx_error})") from None


def fx_trace(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> Graph:
    """The model traced with torch.fx into registered op kinds, or a UserError naming the first op
    that is not supported and where it is in the model's code. The trace records no stacks (0.4 s
    of imports on first use, and a stack per node) unless a refusal needs them: then it runs again
    with them, so the message names the line."""
    try:
        return _fx_trace(model, input_shape, where=False)
    except ModelFails:
        raise
    except UserError:
        return _fx_trace(model, input_shape, where=True)


def _fx_trace(model: nn.Module, input_shape: tuple[int, ...] | list[int], where: bool) -> Graph:
    supported = ", ".join(sorted(KINDS))
    try:
        fx_graph = _Tracer(where).trace(model)
    except Exception as e:  # data-dependent control flow, unsupported Python in forward
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx ({str(e).splitlines()[0]}): qexport needs a "
                        "forward without data-dependent Python control flow") from None
    gm = fx.GraphModule(model, fx_graph)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    except Exception as e:
        root = e.__cause__ or e  # ShapeProp wraps the model's own error in a message with the node's metadata
        raise ModelFails(f"{type(model).__name__} fails on an input of shape (batch, {', '.join(map(str, input_shape))}): "
                         f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0][:300]}") from None
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    alias: dict[str, str] = {}  # value -> the value it is identical to (Dropout, Identity, the input)
    sym: dict[str, str] = {}  # x.size() / x.shape (whole) and x.size(0) (BATCH)
    ops: list[Op] = []
    shapes: dict[str, list[int]] = {INPUT: list(input_shape)}
    output = None

    def refuse(node: fx.Node, what: str, why: str = "") -> UserError:
        return UserError(f"unsupported op {what}{_where(node)}{': ' + why if why else ''} "
                         f"(qexport supports: {supported}; Dropout and Identity pass through)")

    def value(a: Any, node: fx.Node) -> Any:
        if isinstance(a, fx.Node):
            if sym.get(a.name) == BATCH:
                return BATCH
            if a.name in sym:
                raise refuse(node, node.name, "a tensor's shape used other than as x.size(0)")
            return alias.get(a.name, a.name)
        if isinstance(a, (list, tuple)):
            return type(a)(value(v, node) for v in a)
        return a

    for node in fx_graph.nodes:
        if node.op == "placeholder":
            if any(v == INPUT for v in alias.values()):
                raise UserError("the model takes more than one input: qexport supports single-input models")
            alias[node.name] = INPUT
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise UserError("the model returns more than one tensor (a tuple/dict): qexport supports one output")
            output = value(out, node)
            continue
        if node.op == "get_attr":
            raise refuse(node, f"{node.target} (a parameter or buffer used directly in forward)",
                         "put it in a module of a supported kind")
        target = node.target
        if node.op == "call_method" and target == "size" or node.op == "call_function" and target is getattr \
                and len(node.args) == 2 and node.args[1] == "shape":
            dim = node.args[1] if target == "size" and len(node.args) > 1 else node.kwargs.get("dim")
            sym[node.name] = BATCH if dim == 0 else "shape"
            continue
        if node.op == "call_function" and target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0].name in sym:
            if sym[node.args[0].name] != "shape" or node.args[1] != 0:
                raise refuse(node, node.name, "a tensor's shape used other than as x.size(0) / x.shape[0]")
            sym[node.name] = BATCH
            continue
        if node.op == "call_module":
            m = modules[target]
            if isinstance(m, IDENTITY_MODULES):
                alias[node.name] = value(node.args[0], node)
                continue
            kind = kind_of_module(m)
            if kind is None:
                raise refuse(node, f"{target} ({type(m).__name__})")
            try:
                attrs = kind.from_module(m)
            except Unsupported as e:
                raise refuse(node, f"{target} ({type(m).__name__})", str(e)) from None
            ins = [value(node.args[0], node)]
            name = target
        else:
            if node.op == "call_function" and (any(target is f for f in IDENTITY_FUNCTIONS)
                                               or is_identity_call(target, node.args, node.kwargs)) \
                    or node.op == "call_method" and target in IDENTITY_METHODS:
                alias[node.name] = value(node.args[0], node)
                continue
            what = f"{'Tensor.' if node.op == 'call_method' else ''}{_fn_name(target)}"
            kind = kind_of_call(target, node.op == "call_method")
            if kind is None:
                raise refuse(node, f"{node.name} ({what})")
            try:
                tensors, attrs = kind.from_call(target, value(tuple(node.args), node), value(dict(node.kwargs), node))
            except Unsupported as e:
                raise refuse(node, f"{node.name} ({what})", str(e)) from None
            ins, name = list(tensors), node.name
        if any(not isinstance(i, str) or i == BATCH for i in ins):
            raise refuse(node, node.name, "a constant where a tensor is expected")
        try:
            kind.check(attrs, [shapes[i] for i in ins])
        except Unsupported as e:
            raise refuse(node, f"{name} ({kind.name})", str(e)) from None
        ops.append(Op(kind.name, name, ins, node.name, attrs))
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise refuse(node, node.name, "it does not return one tensor")
        shapes[node.name] = list(meta.shape[1:])
    if output is None or not ops:
        raise UserError("the model has no layers to export")
    if output == INPUT:
        raise UserError("the model returns its input unchanged: nothing to quantize")
    # Name the final value OUTPUT so every form's graph output is called `logits`.
    for op in ops:
        op.inputs = [OUTPUT if i == output else i for i in op.inputs]
        if op.out == output:
            op.out = OUTPUT
    shapes[OUTPUT] = shapes.pop(output, [])
    if any(op.out == output for op in ops):
        raise AssertionError("output renaming")
    graph = Graph(ops, list(input_shape), shapes)
    return bind(graph, model)


def bind(graph: Graph, model: nn.Module) -> Graph:
    """The graph's ops with their modules (and an `aten` op's constants) looked up in `model`, a
    constant the model lacks in `graph.constants` (a copy; the graph is unchanged)."""
    ops = []
    for op in graph.ops:
        o = copy.copy(op)
        try:  # (a Linear a capture made of raw parameters is a module of the rebuilt graph only)
            o.module = model.get_submodule(op.name) if KINDS[op.kind].parametric else None
        except AttributeError:
            o.module = None
        if op.attrs.get("consts"):
            o.consts = [_tensor_at(model, n, graph) for n, _, _ in op.attrs["consts"]]
        ops.append(o)
    return Graph(ops, graph.input_shape, graph.shapes, graph.constants, graph.source, graph.renames)


def rebuilt(graph: Graph, model: nn.Module) -> "GraphModel":
    """The graph as a runnable model with `model`'s weights (and the folded constants), eval mode:
    what the back-ends quantize for a torch.export capture, where every Linear/Conv of the graph is
    a module call (attention's output projection is not one in the user's model) in forward order."""
    g = GraphModel(graph)
    want = g.state_dict()
    state = {**graph.constants, **model.state_dict()}
    state.update({k: state[v] for k, v in graph.renames.items()})
    g.load_state_dict({k: v for k, v in state.items() if k in want})
    return g.eval()


def _tensor_at(model: nn.Module, name: str, graph: Graph) -> torch.Tensor:
    *path, leaf = name.split(".")
    try:
        owner = model.get_submodule(".".join(path))
        t = getattr(owner, leaf)
        if isinstance(t, torch.Tensor):
            return t
    except AttributeError:
        pass
    return graph.constants[name]


# ---------------------------------------------------------------------------------------------
# Running a graph.

def _place(root: nn.Module, name: str, m: nn.Module) -> None:
    parent = root
    *path, leaf = name.split(".")
    for p in path:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    if not hasattr(parent, leaf):
        parent.add_module(leaf, m)


class GraphModel(nn.Module):
    """A runnable model rebuilt from a `Graph`: its modules sit at the user's qualified names,
    so its state_dict keys (and quantized layer names) are the user's."""

    def __init__(self, graph: Graph):
        super().__init__()
        for op in graph.ops:
            if KINDS[op.kind].parametric:
                _place(self, op.name, KINDS[op.kind].build(op.attrs))
        for op in graph.ops:  # an `aten` op's constants, as buffers at their names in the user's model
            for name, shape, dtype in const_specs(op.attrs):
                *path, leaf = name.split(".")
                _place(self, ".".join(path), nn.Module()) if path else None
                owner = self.get_submodule(".".join(path))
                if not hasattr(owner, leaf):
                    owner.register_buffer(leaf, torch.zeros(shape, dtype=dtype))
        self.graph = bind(Graph(graph.ops, graph.input_shape, graph.shapes, source=graph.source), self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals = {INPUT: x}
        for op in self.graph.ops:
            vals[op.out] = KINDS[op.kind].run(op, [vals[i] for i in op.inputs])
        return vals[OUTPUT]

    # -- the calibration walk, one layer at a time (see `qadmm.layer_inputs.for_each_input`) -----
    @contextmanager
    def streamed(self, x: torch.Tensor):
        """Within this block `stream_inputs(layer, x, ...)` runs the calibration inputs `x` through
        the graph once in all, not once per layer: the values every later op needs are kept
        between layers, each op computed with the weights it has when the walk reaches it. Valid
        for a walk in forward order that only changes layers at or after the one it reached."""
        self._stream = {"x": x, "pos": 0, "vals": None, "batch": None}
        self._bn_stream = {"key": None, "pos": 0, "vals": None}
        try:
            yield self
        finally:
            self._stream = self._bn_stream = None

    def _advance(self, vals: list[dict[str, torch.Tensor]], start: int, stop: int) -> None:
        """Run ops start..stop-1 on every batch's values, freeing each value after its last reader.
        Batches go one after another through each op, so a BatchNorm in train mode averages them in order."""
        ops = self.graph.ops
        last = {v: k for k, op in enumerate(ops) for v in op.inputs}  # the last op reading each value
        for k in range(start, stop):
            op = ops[k]
            for v in vals:
                v[op.out] = KINDS[op.kind].run(op, [v[i] for i in op.inputs])
                for i in set(op.inputs):
                    if last[i] == k:
                        del v[i]

    @torch.no_grad()
    def stream_inputs(self, layer: nn.Module, x: torch.Tensor, batch_size: int) -> list[torch.Tensor] | None:
        """The input of `layer` per batch of `x` (eval mode), computed from where the walk stands;
        None outside `streamed(x)`, or for other inputs or batches (the caller runs the model)."""
        st = getattr(self, "_stream", None)
        ops = self.graph.ops
        at = next((k for k, op in enumerate(ops) if op.module is layer), None)
        if st is None or st["x"] is not x or at is None or (st["batch"] not in (None, batch_size)):
            return None
        if st["vals"] is None or st["pos"] > at:  # (re)start from the input
            st.update(vals=[{INPUT: x[i:i + batch_size]} for i in range(0, len(x), batch_size)], pos=0, batch=batch_size)
        was_training = self.training
        self.eval()
        try:
            self._advance(st["vals"], st["pos"], at)
        finally:
            self.train(was_training)
        st["pos"] = at
        return [vals[ops[at].inputs[0]] for vals in st["vals"]]

    @torch.no_grad()
    def stream_batchnorm(self, x: torch.Tensor, batches: list[slice], stop_at: nn.Module | None) -> bool:
        """BatchNorm re-estimation (`qadmm.recalibrate.reestimate_bn`, its BatchNorms already in train
        mode) continued from where the walk's previous one stopped: the train-mode values there are kept,
        and only the BatchNorms from there to `stop_at` (or the end) are computed. The same
        statistics as running the batches from the input: those before did not change (the walk only
        changes layers at or after where it stands) and train mode never reads the old ones. False
        outside `streamed`, or for inputs other than a prefix of the walk's (the caller runs the model)."""
        st, bst = getattr(self, "_stream", None), getattr(self, "_bn_stream", None)
        if st is None or bst is None or x.data_ptr() != st["x"].data_ptr():
            return False
        ops = self.graph.ops
        at = len(ops) if stop_at is None else next((k for k, op in enumerate(ops) if op.module is stop_at), None)
        if at is None:
            return False
        key = (len(x), tuple((b.start, b.stop) for b in batches))
        if bst["vals"] is None or bst["key"] != key or bst["pos"] > at:  # (re)start from the input, every
            for op in ops:  # BatchNorm reset (each runs once from here, when the stream reaches it)
                if isinstance(op.module, BATCHNORMS):
                    op.module.reset_running_stats()
            bst.update(key=key, pos=0, vals=[{INPUT: x[b]} for b in batches])
        self._advance(bst["vals"], bst["pos"], at)
        bst["pos"] = at
        if at == len(ops):  # the whole network ran: nothing is kept
            bst.update(key=None, pos=0, vals=None)
        return True


def apply_op(op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
    """The float function of one (possibly fused) op, exactly as the PyTorch modules compute it."""
    y = KINDS[op.kind].run(op, xs)
    if op.bn is not None:
        y = op.bn(y)
    if op.relu:
        y = torch.relu(y)
    if op.relu_max is not None:
        y = torch.clamp(y, max=op.relu_max)  # relu then this: F.relu6 / hardtanh(0, max), value for value
    return y


@torch.no_grad()
def evaluate(ops: list[Op], x: torch.Tensor, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every op's float output for input x (eval-mode modules); with `keep` False, each value is
    freed after its last reader (the output and what no op reads stay)."""
    vals = {INPUT: x}
    last = {v: k for k, op in enumerate(ops) for v in op.inputs}
    for k, op in enumerate(ops):
        vals[op.out] = apply_op(op, [vals[i] for i in op.inputs])
        if not keep:
            for i in set(op.inputs):
                if last.get(i) == k and i != OUTPUT:
                    vals.pop(i, None)
    return vals


def fuse(graph: Graph, split_silu: bool = True) -> list[Op]:
    """The ops for export: a BatchNorm and then a ReLU or ReLU6 folded into the linear/conv before
    them (also into an add) where that op is their only producer and they its only consumer. A
    folded ReLU6 makes the value's uint8 range [0, hi <= 6]: the integer kernel's clamp is the clip,
    as onnxruntime's quantizer fuses it, instead of a float island quantizing the conv's wider range.
    A SiLU, x·σ(x), becomes a sigmoid and a product (`split_silu`): the integer forms then quantize
    σ(x) on its own calibrated range and onnxruntime runs QLinearSigmoid and QLinearMul, where one
    float island cost a third of efficientnet_b0's time (benchmarks/zoo.py; the weights form writes
    the same two nodes either way). A file written before the split is verified unsplit."""
    uses: dict[str, int] = {OUTPUT: 1}
    for op in graph.ops:
        for i in op.inputs:
            uses[i] = uses.get(i, 0) + 1
    names = set(uses) | {op.out for op in graph.ops}
    fused: list[Op] = []
    for op in graph.ops:
        prev = fused[-1] if fused else None
        single = prev is not None and op.inputs == [prev.out] and uses.get(prev.out, 0) == 1
        if single and op.kind == "batchnorm" and prev.kind in ("linear", "conv") and prev.bn is None and not prev.relu:
            prev.bn, prev.bn_name, prev.out = op.module, op.name, op.out
        elif single and op.kind == "relu" and prev.kind in ("linear", "conv", "add") and not prev.relu:
            prev.relu, prev.out = True, op.out
        elif single and op.kind in ("relu6", "hardtanh") and op.attrs.get("min_val") == 0.0 and op.attrs["max_val"] > 0 \
                and prev.kind in ("linear", "conv", "add") and not prev.relu:
            prev.relu, prev.relu_max, prev.out = True, float(op.attrs["max_val"]), op.out
        elif op.kind == "silu" and split_silu:
            sig = f"{op.out}_sigmoid"
            while sig in names:  # a name of the model's own
                sig += "_"
            fused += [Op("sigmoid", f"{op.name}.sigmoid", list(op.inputs), sig), Op("mul", op.name, [op.inputs[0], sig], op.out)]
        else:
            fused.append(copy.copy(op))
    return fused
