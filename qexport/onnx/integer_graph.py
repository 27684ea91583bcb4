"""What the two integer forms (`qdq`, `qoperator`) share: the start (int8 codes only, the raw input
quantized if an op reads it), a float island for an op without an integer kernel (DequantizeLinear ->
float op -> QuantizeLinear), and the end (DequantizeLinear of the output).

Consecutive float islands pass their values on in float (`float_values`): quantizing a value that
only float ops read would add rounding error and gain no integer kernel. That is what keeps a
ratio such as efficientvit's linear attention, x / (sum + 1e-15), finite (the quantized sum is
often exactly 0, and the 1e-15 vanishes in its step), and attention's scores and softmax in fp32."""
from __future__ import annotations

from qadmm.errors import UserError
from qexport.onnx.builder import finish, metadata
from qexport.ops.emit import Builder, QParamInits, emit_float_op, qname
from qexport.ops import KINDS
from qexport.ops.base import INPUT, OUTPUT, Ctx, Op


def check_int8(art) -> None:
    """Integer kernels take int8 weights: refuse wider codes (the thesis scheme at 8 bits, ±255)."""
    for name, lc in art.layers.items():
        if lc.codes.qmax > 127:
            raise UserError(f"layer {name} has {lc.codes.describe()} codes, which do not fit int8: integer forms "
                            f"need codes within ±127; export with --form weights (INT16) or quantize with --scheme symmetric")


def reads_input(ops: list[Op]) -> bool:
    """Whether the integer graph quantizes the raw input (an op other than the normalisation reads it)."""
    return any(INPUT in op.inputs and not KINDS[op.kind].float_input for op in ops)


def float_values(ops: list[Op], layers: dict) -> set[str]:
    """The values the integer forms keep in float: computed in float (by a float island, or by an op
    that only moves or selects a float value) and read only by ops that compute in float (float
    islands onnxruntime does not fuse into an integer kernel, and moves, which commute with
    quantization). Every other value is uint8."""
    readers: dict[str, list[Op]] = {}
    for op in ops:
        for i in op.inputs:
            readers.setdefault(i, []).append(op)

    def island(op: Op) -> bool:
        kind = KINDS[op.kind]
        return not kind.float_input and not kind.runs_integer(op, layers)

    floats: set[str] = set()
    for op in ops:
        moves_float = KINDS[op.kind].pass_through and op.inputs[0] in floats
        if (island(op) or moves_float) and op.out != OUTPUT and op.out in readers \
                and all((island(r) and not KINDS[r.kind].fused_by_onnxruntime(r)) or KINDS[r.kind].pass_through
                        for r in readers[op.out]):
            floats.add(op.out)
    return floats


def computes_float(ctx: Ctx, op: Op) -> bool:
    """Whether `op` must be written as a float island whatever its kind: it reads or yields a value
    kept in float."""
    return op.out in ctx.floats or any(i in ctx.floats for i in op.inputs)


def start_integer_graph(art, ops: list[Op], qp: dict, opset: int | None) -> Ctx:
    """What both integer forms begin with: refuse codes beyond int8, quantize the raw input if read."""
    check_int8(art)
    b = Builder(opset)
    ctx = Ctx(b, art.layers, qp, QParamInits(b, qp, ops), art.graph.shapes, ops=ops, input_shape=art.graph.input_shape,
              floats=float_values(ops, art.layers))
    if reads_input(ops):
        b.node("QuantizeLinear", [INPUT, *ctx.qpi(INPUT)], qname(INPUT))
    return ctx


def float_island(ctx: Ctx, op: Op) -> None:
    """DequantizeLinear inputs -> float op -> QuantizeLinear, minus the DequantizeLinear of an input
    and the QuantizeLinear of the output kept in float (`ctx.floats`); the normalisation reads the
    raw input (in one QuantizeLinear of it, where the kind can fold itself into that: `input_qparams`)."""
    kind = KINDS[op.kind]
    raw = kind.input_qparams(op, ctx.qp[op.out]) if kind.float_input else None
    if raw is not None:
        b, v = ctx.b, qname(op.out)
        ctx.qpi(op.out)  # the value's own parameters, which its readers use (and `verify` reads)
        b.node("QuantizeLinear", [INPUT, b.init(f"{v}.input_scale", raw.scale), b.init(f"{v}.input_zero_point", raw.zero_point)], v)
        return
    ins = op.inputs if kind.float_input else [f"{i}.float" if i in ctx.floats else ctx.qpi.dq(i) for i in op.inputs]
    y = emit_float_op(ctx, op, ins, f"{op.out}.float")
    if op.out not in ctx.floats:
        ctx.b.node("QuantizeLinear", [y, *ctx.qpi(op.out)], qname(op.out))


def end_integer_graph(ctx: Ctx, art, form: str, calib: dict):
    ctx.b.node("DequantizeLinear", [qname(OUTPUT), *ctx.qpi(OUTPUT)], OUTPUT)
    return finish(ctx.b, art.graph.input_shape, art.graph.shapes[OUTPUT], metadata(art, form, {"calibration": calib}))
