"""`export_onnx`: an artifact in one ONNX form (the entry point of `qexport to-onnx` and the API)."""
from __future__ import annotations

import numpy as np

from qadmm.errors import UserError
from qexport.graph import fuse
from qexport.onnx.forms import get_form

DEQUANT = ("cast", "dequantizelinear")  # how the weights form dequantizes (builder.float_weight)


def export_onnx(art, form: str, x_calib: np.ndarray | None = None, calib=None, progress: bool = False,
                opset: int | None = None, dequant: str = "cast"):
    """The ONNX ModelProto of a loaded artifact in one form. Integer forms need training features
    `x_calib` for the activation ranges (`calib`: a `CalibConfig`, default min-max on 8x64).
    `opset`: the ONNX opset to write (default: the lowest the graph needs). `dequant`: how the
    `weights` form turns codes into float weights (`cast` or `dequantizelinear`, see
    `builder.float_weight`)."""
    from qexport.onnx.calibrate import CalibConfig, calibrate

    f = get_form(form)
    if dequant not in DEQUANT:
        raise UserError(f"unknown dequant {dequant!r}: use one of {', '.join(DEQUANT)}")
    if dequant != "cast" and f.integer:
        raise UserError(f"dequant {dequant!r} applies to the weights form only (form {form!r} has integer kernels)")
    if opset is not None and not 13 <= opset <= 25:
        raise UserError(f"--opset {opset}: qexport writes opsets 13 to 25")
    ops = fuse(art.graph)
    if not f.integer:
        return f.export(art, ops, opset, dequant)
    from qexport.onnx.integer_graph import check_int8

    check_int8(art)  # refuse before spending time on calibration
    if x_calib is None:
        raise UserError(f"--form {form} needs calibration data for the activation ranges: pass --data")
    calib = calib or CalibConfig()
    qp = calibrate(ops, x_calib, calib, progress)
    return f.export(art, ops, qp, calib.describe(), opset)
