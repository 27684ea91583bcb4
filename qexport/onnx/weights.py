"""`--form weights`: integer weights, float compute.

Each quantized layer's codes are an initializer of the narrowest ONNX integer type that holds
them and the opset allows (INT2 for binary/ternary, INT4 up to ±7, INT8 up to ±127, INT16 for the
thesis scheme's ±255), followed by DequantizeLinear with α (per tensor, or per output channel on
axis 0) and the float Gemm/Conv. INT4/INT2 initializers are bit-packed in the file, so its size
follows the bit width. The codes become float weights through Cast · α (default: onnxruntime folds
them at load, fp32 speed under default settings) or DequantizeLinear (`dequant`, see
`builder.float_weight`).
"""
from __future__ import annotations

from qexport.onnx.builder import finish, metadata
from qexport.ops.emit import Builder, emit_float_op, narrowest_type
from qexport.ops.base import Ctx, Op


def export_weights(art, ops: list[Op], opset: int | None = None, dequant: str = "cast"):
    """The `weights` form ModelProto of a loaded artifact and its fused ops."""
    ctx = Ctx(Builder(opset, dequant=dequant), art.layers, shapes=art.graph.shapes, ops=ops,
              input_shape=art.graph.input_shape)
    for lc in art.layers.values():  # the opset the weight types need, known before any node is written
        narrowest_type(ctx.b, lc)
    for op in ops:
        emit_float_op(ctx, op, op.inputs, op.out)
    types = {name: narrowest_type(ctx.b, lc)[0] for name, lc in art.layers.items()}
    return finish(ctx.b, art.graph.input_shape, art.graph.shapes["logits"], metadata(art, "weights", {"weight_types": types, "dequant": dequant}))
