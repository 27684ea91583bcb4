"""The two zoo architectures trained on Fashion-MNIST (models/fashion-mobilenet_v2, models/fashion-vit):
test accuracy at 8/4/3/2 bits per channel for ptq, gptq and ldnq, beside onnxruntime's int8
`quantize_static` (QDQ, per channel, MinMax) on the same model and calibration images, in one run.

Inputs are the raw pixels scaled to [0, 1] (the models were trained so; qexport is told with
`normalize=(0, 255)`, the CLI's `--normalize 0,255`). Calibration: the first --calib training
images; test: the official 10,000. Each qexport row also says whether its int8 qdq file passes
`verify` (8-bit rows; the others are not int8) and its test accuracy in onnxruntime (int8 weights
and activations, all 10,000 test images: the number to set beside onnxruntime's int8).

    OMP_NUM_THREADS=2 python benchmarks/zoo_trained.py --out benchmarks/results/zoo-trained.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import zoo_models  # noqa: E402
from zoo import onnxruntime_steps, paired_speed, session  # noqa: E402

MODELS = {"fashion-mobilenet_v2": "fashion_mobilenet_v2", "fashion-vit": "fashion_vit"}


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (%) of an ONNX classifier in onnxruntime on every test image."""
    sess = session(path)
    out = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: np.asarray(x[i:i + 500], np.float32)})[0]
                          for i in range(0, len(x), 500)])
    return round(float((out.argmax(1) == y).mean() * 100), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default="ptq,gptq,ldnq")
    ap.add_argument("--bits", default="8,4,3,2")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from qadmm.data import from_arrays, load_dataset
    from qexport import api

    fm = load_dataset("fashion-mnist", seed=0)
    data = from_arrays("fashion-mnist", fm.x_train[:a.calib], fm.y_train[:a.calib], fm.x_test, fm.y_test,
                       info={"source": "fashion-mnist", "calibration": f"first {a.calib} training images"})
    x01_train, x01_test = fm.x_train[:a.calib] / 255.0, fm.x_test / 255.0
    results = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    for name in a.models.split(","):
        model = getattr(zoo_models, MODELS[name])()
        model.load_state_dict(load_file(str(HERE.parent / "models" / f"{name}.safetensors")))
        model.eval()
        with torch.no_grad():
            ref = torch.cat([model(torch.as_tensor(x01_test[i:i + 500])) for i in range(0, len(x01_test), 500)]).numpy()
        res = results.setdefault(name, {})
        res["float"] = round(float((ref.argmax(1) == fm.y_test).mean() * 100), 2)
        with tempfile.TemporaryDirectory() as tmp:
            ort = onnxruntime_steps(model, x01_train.astype(np.float32), x01_test.astype(np.float32), ref, Path(tmp))
            graphs = {fmt: r.pop("path") for fmt, r in ort.items() if "path" in r}  # timed in turns, as in zoo.py
            for fmt, ms in paired_speed({k: session(p) for k, p in graphs.items()}, x01_test.astype(np.float32)).items():
                ort[fmt]["ms"] = ms
            for fmt in ("qdq", "qoperator"):
                if ort.get(fmt, {}).get("ok"):
                    ort[fmt]["accuracy"] = onnx_accuracy(Path(tmp) / f"ort-{fmt}.onnx", x01_test, fm.y_test)
            res["onnxruntime int8"] = ort
            for method in a.methods.split(","):
                for bits in map(int, a.bits.split(",")):
                    key = f"{method} {bits}b"
                    if key in res:
                        continue
                    t = time.perf_counter()
                    art = api.quantize(model, data, method, bits, per_channel=True, calib_samples=a.calib, normalize=(0.0, 255.0))
                    row = {"accuracy": round(art.meta["accuracy"]["quantized_test"], 2), "seconds": round(time.perf_counter() - t, 1)}
                    if bits == 8:
                        path = Path(tmp) / f"{method}.qdq.onnx"
                        api.to_onnx(art, path, "qdq", data)
                        rep = api.verify(path, art, data, max_samples=1000)
                        row["qdq_verify"] = "PASSED" if rep["passed"] else "FAILED"
                        x = np.asarray(fm.x_test).reshape(len(fm.x_test), *art.meta["architecture"]["input_shape"])
                        row["qdq_onnxruntime_accuracy"] = onnx_accuracy(path, x, fm.y_test)
                    res[key] = row
                    print(name, key, json.dumps(row), flush=True)
                    Path(a.out).write_text(json.dumps(results, indent=2))
        Path(a.out).write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    lines = []
    for name, res in results.items():
        ort = res.get("onnxruntime int8", {})
        lines += [f"**{name}** (float {res.get('float')}%; onnxruntime int8 QDQ "
                  f"{ort.get('qdq', {}).get('accuracy', '-')}%, QOperator {ort.get('qoperator', {}).get('accuracy', '-')}%)", "",
                  "| method | 8 bits | 4 bits | 3 bits | 2 bits |", "|---|---|---|---|---|"]
        for method in ("ptq", "gptq", "ldnq"):
            cells = []
            for bits in (8, 4, 3, 2):
                r = res.get(f"{method} {bits}b")
                cells.append("-" if r is None else f"{r['accuracy']:.2f}% ({r['seconds']:.0f} s)")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        int8 = [f"{m} {res[f'{m} 8b']['qdq_onnxruntime_accuracy']:.2f}%" for m in ("ptq", "gptq", "ldnq")
                if "qdq_onnxruntime_accuracy" in res.get(f"{m} 8b", {})]
        if int8:
            lines += ["", "int8 weights and activations (the 8-bit qdq file in onnxruntime, 10,000 test images): " + ", ".join(int8)]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
