"""`export_onnx`: an artifact in one ONNX form (the entry point of `qexport to-onnx` and the API)."""
from __future__ import annotations

import numpy as np

from qadmm.errors import UserError
from qexport.graph import fuse

FORMS = ("weights", "qdq", "qoperator")
DEQUANT = ("cast", "dequantizelinear")  # how the weights form dequantizes (builder.float_weight)


def export_onnx(art, form: str, x_calib: np.ndarray | None = None, calib=None, progress: bool = False,
                opset: int | None = None, dequant: str = "cast"):
    """The ONNX ModelProto of a loaded artifact in one form. Integer forms need training features
    `x_calib` for the activation ranges (`calib`: a `CalibConfig`, default min-max on 8x64).
    `opset`: the ONNX opset to write (default: the lowest the graph needs). `dequant`: how the
    `weights` form turns codes into float weights (`cast` or `dequantizelinear`, see
    `builder.float_weight`)."""
    from qexport.onnx.calibrate import CalibConfig, calibrate

    if form not in FORMS:
        raise UserError(f"unknown form {form!r}: use one of {', '.join(FORMS)}")
    if dequant not in DEQUANT:
        raise UserError(f"unknown dequant {dequant!r}: use one of {', '.join(DEQUANT)}")
    if dequant != "cast" and form != "weights":
        raise UserError(f"dequant {dequant!r} applies to the weights form only (form {form!r} has integer kernels)")
    if opset is not None and not 13 <= opset <= 25:
        raise UserError(f"--opset {opset}: qexport writes opsets 13 to 25")
    ops = fuse(art.graph)
    if form == "weights":
        from qexport.onnx.weights import export_weights

        return export_weights(art, ops, opset, dequant)
    from qexport.onnx.qoperator import check_int8

    check_int8(art)  # refuse before spending time on calibration
    if x_calib is None:
        raise UserError(f"--form {form} needs calibration data for the activation ranges: pass --data")
    calib = calib or CalibConfig()
    qp = calibrate(ops, x_calib, calib, progress)
    if form == "qdq":
        from qexport.onnx.qdq import export_qdq

        return export_qdq(art, ops, qp, calib.describe(), opset)
    from qexport.onnx.qoperator import export_qoperator

    return export_qoperator(art, ops, qp, calib.describe(), opset)
