"""`--form weights`: integer weights, float compute.

Each quantized layer's codes are an initializer of the narrowest ONNX integer type that holds
them (INT2 for binary/ternary, INT4 up to ±7, INT8 up to ±127, INT16 for the thesis scheme's ±255),
followed by DequantizeLinear with α (per tensor, or per output channel on axis 0) and the float
Gemm/Conv. INT4/INT2 initializers are bit-packed in the file, so its size follows the bit width.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from qadmm.spec import LayerCodes
from qexport.onnx.builder import Builder, Op, conv_attrs, finish, metadata, normalize_nodes, pool_attrs

# (ONNX type name, numpy dtype, largest |code| it holds symmetrically)
INT_TYPES = (("INT2", ml_dtypes.int2, 1), ("INT4", ml_dtypes.int4, 7), ("INT8", np.int8, 127), ("INT16", np.int16, 32767))


def narrowest_type(lc: LayerCodes) -> tuple[str, type]:
    """The smallest signed ONNX integer type holding every code of the layer's code set."""
    for name, dtype, qmax in INT_TYPES:
        if lc.codes.qmax <= qmax:
            return name, dtype
    raise AssertionError(lc.codes)


def dequantized_weight(b: Builder, name: str, lc: LayerCodes) -> str:
    """codes (narrowest int type) -> DequantizeLinear(α, axis 0) -> float weight, named `<layer>.weight`."""
    tname, dtype = narrowest_type(lc)
    b.uses_int2 |= tname == "INT2"
    codes = b.init(f"{name}.codes", lc.q.numpy().astype(dtype))
    alpha = b.init(f"{name}.alpha", lc.alpha.numpy().astype(np.float32))
    attrs = {"axis": 0} if lc.per_channel else {}
    return b.node("DequantizeLinear", [codes, alpha], f"{name}.weight", **attrs)


def bn_node(b: Builder, bn, x: str, out: str, prefix: str) -> str:
    """Eval-mode BatchNormalization with the module's statistics (exact float semantics)."""
    c = bn.num_features
    gamma = bn.weight.detach().numpy() if bn.affine else np.ones(c, np.float32)
    beta = bn.bias.detach().numpy() if bn.affine else np.zeros(c, np.float32)
    ins = [x] + [b.init(f"{prefix}.bn_{k}", np.asarray(v, np.float32)) for k, v in
                 (("gamma", gamma), ("beta", beta), ("mean", bn.running_mean.numpy()), ("var", bn.running_var.numpy()))]
    return b.node("BatchNormalization", ins, out, epsilon=float(bn.eps))


def emit_float_op(b: Builder, op: Op, ins: list[str], layers: dict[str, LayerCodes], out: str) -> str:
    """The float ONNX nodes of one op (normalisation included), output named `out`. Used as the
    whole `weights` form and for the float islands (kept float layers, standalone BN/ReLU,
    AvgPool2d) of the integer forms."""
    m = op.module

    def tail(y: str) -> str:
        # the op's core result `y`, then the fused BatchNorm and ReLU; the last one is named `out`
        post = (["bn"] if op.bn is not None else []) + (["relu"] if op.relu else [])
        for i, p in enumerate(post):
            name = out if i == len(post) - 1 else f"{out}.{p}_in"
            y = bn_node(b, op.bn, y, name, op.name) if p == "bn" else b.node("Relu", [y], name)
        return y

    core = out if op.bn is None and not op.relu else f"{out}.core"
    if op.kind == "normalize":
        y = normalize_nodes(b, op, ins[0])
        return b.node("Identity", [y], out)
    if op.kind in ("linear", "conv"):
        w = dequantized_weight(b, op.name, layers[op.name]) if op.name in layers else \
            b.init(f"{op.name}.weight", m.weight.detach().numpy().astype(np.float32))
        args = [ins[0], w] + ([b.init(f"{op.name}.bias", m.bias.detach().numpy().astype(np.float32))] if m.bias is not None else [])
        if op.kind == "linear":
            y = b.node("Gemm", args, core, transB=1)
        else:
            y = b.node("Conv", args, core, **conv_attrs(m))
        return tail(y)
    if op.kind == "bn":
        return tail(bn_node(b, m, ins[0], core, op.name))
    if op.kind == "relu":
        return tail(b.node("Relu", ins, core))
    if op.kind == "add":
        return tail(b.node("Add", ins, core))
    if op.kind == "flatten":
        return tail(b.node("Flatten", ins, core, axis=1))
    if op.kind == "maxpool":
        return tail(b.node("MaxPool", ins, core, **pool_attrs(m)))
    if op.kind == "avgpool":
        return tail(b.node("AveragePool", ins, core, **pool_attrs(m)))
    if op.kind == "gap":
        return tail(b.node("GlobalAveragePool", ins, core))
    raise AssertionError(op.kind)


def export_weights(art, ops: list[Op]):
    """The `weights` form ModelProto for a loaded artifact and its traced ops."""
    b = Builder()
    for op in ops:
        emit_float_op(b, op, op.inputs, art.layers, op.out)
    arch = art.meta["architecture"]
    types = {name: narrowest_type(lc)[0] for name, lc in art.layers.items()}
    return finish(b, tuple(arch["input_shape"]), arch["num_classes"], metadata(art, "weights", {"weight_types": types}))

