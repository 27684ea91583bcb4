"""What an operator kind is: the one place that knows everything about one kind of layer.

A kind (one small module in `qexport/ops/`, one instance `KIND` there) says

- which traced PyTorch code it matches: leaf `modules`, `functions` (torch.* / F.* / operator.*)
  and Tensor `methods`; `from_module` / `from_call` read its attributes (plain JSON values) and
  refuse what it cannot express with `Unsupported(reason)`;
- how to rebuild its module from those attributes (`build`) so a saved graph runs without the
  user's code, and how it computes in float (`run`);
- how to write it as float ONNX (`onnx`), and, where an integer kernel exists, as QOperator
  (`qoperator`), QDQ (`qdq`) and in the integer reference (`integer`). A kind without them runs
  as a float island (DequantizeLinear -> float op -> QuantizeLinear) in the integer forms;
- how its uint8 value relates to its input's (`pass_through`: the same scale and zero point,
  exact on uint8, e.g. Flatten or MaxPool) and whether it is never negative (`nonnegative`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


INPUT = "input"  # the graph's input value (raw features)
OUTPUT = "logits"  # its output value


class Unsupported(Exception):
    """The traced code is of this kind but uses something the kind cannot express (the reason)."""


@dataclass
class Op:
    """One node of the traced model.

    `name` is the module's qualified name (modules) or the traced node's name (functions); `out`
    names the value it produces (also its ONNX tensor name). `attrs` are JSON values: everything
    needed to rebuild the module and emit ONNX. After fusion for export, `bn` is a BatchNorm folded
    after a linear/conv (`bn_name` its module name) and `relu` a ReLU (or with `relu_max`, a ReLU6)
    folded after it.
    """

    kind: str
    name: str
    inputs: list[str]
    out: str
    attrs: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = None  # bound from the model, never serialised
    bn: nn.Module | None = None
    bn_name: str | None = None
    relu: bool = False
    relu_max: float | None = None  # a ReLU6 (Hardtanh(0, max)) folded in: relu, then clamp at this
    consts: list | None = None  # bound constant tensors of an `aten` op (attrs["consts"] names them)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "inputs": list(self.inputs), "out": self.out, "attrs": self.attrs}


@dataclass
class Ctx:
    """What an emitter needs besides the op: the graph under construction, the artifact's codes
    (layer name -> LayerCodes), the activation quantization parameters and their initializers."""

    b: Any  # qexport.onnx.builder.Builder
    layers: dict
    qp: dict | None = None  # value -> QParams (integer forms)
    qpi: Any = None  # QParamInits (integer forms)
    shapes: dict = field(default_factory=dict)  # value -> shape without the batch axis
    ops: list = field(default_factory=list)  # the (fused) ops being written
    input_shape: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    floats: set = field(default_factory=set)  # values the integer forms keep in float (`float_values`)

    def examples(self, op: "Op") -> tuple[list[torch.Tensor], list[list[int]]]:
        """Example values of `op`'s inputs (the graph run on a batch of 2) and, per input, the
        axes whose size follows the batch (they differ on a batch of 3)."""
        if "values" not in self.cache:
            from qexport.graph import evaluate

            self.cache["values"] = [evaluate(self.ops, torch.zeros(n, *self.input_shape)) for n in (2, 3)]
        v2, v3 = self.cache["values"]
        xs = [v2[i] for i in op.inputs]
        dynamic = [[d for d in range(v2[i].dim()) if v2[i].shape[d] != v3[i].shape[d]] for i in op.inputs]
        return xs, dynamic


class Kind:
    name: str = ""
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    pass_through = False  # uint8 value shares its input's scale and zero point (exact on uint8)
    nonnegative = False  # never negative: calibrated with lo = 0 (zero point 0)
    float_input = False  # reads the raw float input itself (normalisation)
    parametric = False  # has parameters or buffers: a module at op.name, rebuilt by `build`
    min_opset = 13

    # -- tracing -------------------------------------------------------------------------------
    def from_module(self, m: nn.Module) -> dict[str, Any]:
        return {}

    def from_call(self, target: Any, args: tuple, kwargs: dict) -> tuple[list, dict[str, Any]]:
        """(tensor operands in order, attributes) of a function or Tensor-method call; `args` holds
        fx Nodes for tensors and plain values for constants (the first arg of a method is self)."""
        raise Unsupported("not callable as a function")

    def check(self, attrs: dict[str, Any], in_shapes: list[list[int]]) -> None:
        """Refuse (Unsupported) what cannot be exported on these input shapes (no batch axis);
        may complete `attrs` with what the shapes determine (e.g. an adaptive pool's kernel)."""

    def build(self, attrs: dict[str, Any]) -> nn.Module | None:
        """The module (parametric kinds) this op's parameters live in, rebuilt from its attributes."""
        raise NotImplementedError(self.name)

    def check_stored(self, attrs: dict[str, Any]) -> None:
        """Attributes read from a file, checked before anything uses them (ValueError: malformed)."""

    # -- float compute -------------------------------------------------------------------------
    def run(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return op.module(xs[0])

    # -- ONNX ----------------------------------------------------------------------------------
    def runs_integer(self, op: Op, layers: dict) -> bool:
        """Whether the integer forms compute this op with an integer kernel (`integer`, `qoperator`,
        `qdq`); otherwise it is a float island (DequantizeLinear -> float op -> QuantizeLinear)."""
        return False

    def fused_by_onnxruntime(self, op: Op) -> bool:
        """Whether onnxruntime's graph optimisations turn this float island (DequantizeLinear ->
        op -> QuantizeLinear) into one integer kernel, which they do only when every input is
        quantized: its inputs then stay uint8 even where float values could be passed on."""
        return False

    def onnx(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> str:
        raise NotImplementedError(self.name)

    def qoperator(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        """Emit the integer kernel reading/writing uint8 values; False: run as a float island."""
        return False

    def qdq(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        """Emit the QDQ pattern onnxruntime fuses to the integer kernel; False: float island."""
        return False

    def integer(self, ctx: Ctx, op: Op, qs: list[torch.Tensor]) -> torch.Tensor | None:
        """onnxruntime's integer arithmetic on uint8 inputs (as int64); None: float island."""
        return None

    # -- C (`qexport to-c`, qexport.pack.c_integer) ---------------------------------------------
    def c(self, cg: Any, op: Op) -> bool:
        """Append the C call that computes this op's uint8 value to `cg.calls` (values written as
        {name}, replaced by arena pointers); False: no C kernel, `to-c` refuses the model."""
        return False

    # -- kinds that read the raw float input (`float_input`) ------------------------------------
    def calibrated(self, op: Op, p: Any, lo: float) -> Any:
        """The uint8 parameters (QParams) of this op's value, given the calibrated ones and the
        value's calibrated minimum: a kind may adjust them (see `input_qparams`)."""
        return p

    def input_qparams(self, op: Op, p: Any) -> Any:
        """QParams with which one QuantizeLinear of the raw input gives this op's uint8 value
        under `p`, replacing the float op; None: the op runs in float before the quantization."""
        return None


def pair(v: Any, n: int = 2) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(a) for a in v]


def arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    """Positional argument i or keyword `name` of a traced call."""
    return args[i] if len(args) > i else kwargs.get(name, default)


class Reshaping(Kind):
    """A kind that only moves values (Flatten, Reshape): integer graphs apply it to the uint8
    value itself, which keeps its input's scale and zero point."""

    pass_through = True

    def runs_integer(self, op: Op, layers: dict) -> bool:
        return True

    def qoperator(self, ctx: Ctx, op: Op, ins: list[str], out: str) -> bool:
        self.onnx(ctx, op, ins, out)
        return True

    def integer(self, ctx: Ctx, op: Op, qs: list[torch.Tensor]) -> torch.Tensor | None:
        return self.run(op, qs)

    def c(self, cg: Any, op: Op) -> bool:
        cg.aliases[op.out] = op.inputs[0]  # the same bytes in C order: no code at all
        return True
