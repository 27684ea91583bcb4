"""Float values between float islands, A/B/C: one artifact per zoo model exported three ways: as
qexport writes it (a value only float ops read stays float, unless onnxruntime fuses its reader
into an integer kernel: an SE gate's product), with float gates (every value only float ops read
stays float, the rule of the round before), and with every value quantized; milliseconds per run
at batch 1 and 32 (the sessions alternating, median) and SQNR / top-1 agreement of each file
against the PyTorch fp32 model on 500 test images.

    python benchmarks/float_values_ab.py --models "efficientnet_b0,timm efficientvit_b0"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402
from zoo_models import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="efficientnet_b0,mobilenet_v3_small,mobilenet_v3_large,regnet_y_400mf,timm efficientvit_b0")
    ap.add_argument("--out", type=Path, default=Path("runs/float-values-ab"))
    a = ap.parse_args()
    import qexport.onnx.integer_graph as integer_graph
    from qexport.ops.mul import KIND as MUL
    from qexport import api

    torch.set_num_threads(1)
    real = integer_graph.float_values
    x_train, y_train, x_test, y_test = zoo.images(512 + 64, 500, None)
    data = api.as_dataset((x_train, y_train, x_test, y_test))
    calib = data.calibration(512)
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.models.split(","):
        model = build(name, x=calib)
        with torch.no_grad():
            ref = model(torch.as_tensor(x_test)).numpy()
        art = api.quantize(model, data, "ptq", 8, per_channel=True, calib_samples=512)
        for form in ("qdq", "qoperator"):
            sess = {}
            fused = MUL.fused_by_onnxruntime
            variants = (("float values", real, fused), ("float gates", real, lambda op: False),
                        ("all quantized", lambda ops, layers: set(), fused))
            for tag, fv, fuses in variants:
                integer_graph.float_values, MUL.fused_by_onnxruntime = fv, fuses
                path = a.out / f"{tag.replace(' ', '-')}.onnx"
                try:
                    api.to_onnx(art, path, form, data)
                finally:
                    integer_graph.float_values, MUL.fused_by_onnxruntime = real, fused
                sess[tag] = zoo.session(path)
            paired = zoo.paired_speed(sess, x_test, {1: 30, 32: 8})  # {graph: {"1": ms, "32": ms}}
            ms = {b: {k: paired[k][str(b)] for k in sess} for b in (1, 32)}
            close = {k: zoo.closeness(s, x_test, ref) for k, s in sess.items()}
            new = "float values"
            print(f"{name} {form}: " + "; ".join(
                f"{k}: b1 {ms[1][k]:.2f} ms ({ms[1][k] / ms[1][new]:.2f}x), b32 {ms[32][k]:.1f} ms ({ms[32][k] / ms[32][new]:.2f}x), "
                f"SQNR {close[k]['sqnr_db']} dB, agreement {close[k]['agreement']} %" for k in sess), flush=True)


if __name__ == "__main__":
    main()
