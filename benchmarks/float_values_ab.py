"""Float values between float islands, A/B: one artifact per zoo model exported twice, as qexport
writes it (a value only float ops read stays float) and with every value quantized (as before);
milliseconds per run at batch 1 and 32 (the two sessions alternating, median) and SQNR / top-1
agreement of each file against the PyTorch fp32 model on 500 test images.

    python benchmarks/float_values_ab.py --models "efficientnet_b0,timm efficientvit_b0"
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402
from zoo_models import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="efficientnet_b0,mobilenet_v3_small,swin (small config),timm efficientvit_b0")
    ap.add_argument("--out", type=Path, default=Path("runs/float-values-ab"))
    a = ap.parse_args()
    import qexport.onnx.integer_graph as integer_graph
    from qadmm.train import agreement
    from qexport import api

    torch.set_num_threads(1)
    real = integer_graph.float_values
    x_train, y_train, x_test, y_test = zoo.images(512 + 64, 500, None)
    data = api.as_dataset((x_train, y_train, x_test, y_test))
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.models.split(","):
        model = build(name, x=torch.as_tensor(x_train))
        with torch.no_grad():
            ref = model(torch.as_tensor(x_test))
        art = api.quantize(model, data, "ptq", 8, per_channel=True, calib_samples=512)
        for form in ("qdq", "qoperator"):
            sess = {}
            for tag, fv in (("float values", real), ("all quantized", lambda ops, layers: set())):
                integer_graph.float_values = fv
                path = a.out / f"{tag.replace(' ', '-')}.onnx"
                try:
                    api.to_onnx(art, path, form, data)
                finally:
                    integer_graph.float_values = real
                sess[tag] = zoo.session(path)
            ms = {}
            for b in (1, 32):
                x = np.asarray(x_test[:b], np.float32)
                t = {k: [] for k in sess}
                for _ in range(30 if b == 1 else 8):
                    for k, s in sess.items():
                        t0 = time.perf_counter()
                        s.run(None, {s.get_inputs()[0].name: x})
                        t[k].append(time.perf_counter() - t0)
                ms[b] = {k: float(np.median(v)) * 1e3 for k, v in t.items()}
            close = {k: agreement(ref, torch.as_tensor(np.concatenate([s.run(None, {s.get_inputs()[0].name: np.asarray(
                x_test[i:i + 100], np.float32)})[0] for i in range(0, len(x_test), 100)])), True) for k, s in sess.items()}
            new, old = "float values", "all quantized"
            print(f"{name} {form}: ms b1 {ms[1][new]:.2f} vs {ms[1][old]:.2f} ({ms[1][new] / ms[1][old]:.2f}x), "
                  f"b32 {ms[32][new]:.1f} vs {ms[32][old]:.1f} ({ms[32][new] / ms[32][old]:.2f}x); "
                  f"SQNR {close[new]['sqnr_db']} vs {close[old]['sqnr_db']} dB; "
                  f"agreement {close[new]['top1_agreement']} vs {close[old]['top1_agreement']} %", flush=True)


if __name__ == "__main__":
    main()
