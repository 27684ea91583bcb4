"""Speed and size of qexport's ONNX forms against fp32 ONNX and onnxruntime's own quantize_static.

For the MNIST MLP and ResNet-20 (trained briefly on mnist-10k: accuracy is not the point here),
exports every form and measures, in one process on one machine: file size, accuracy, and the
median latency at batch 1 and 64 with 2 intra-op threads and all graph optimisations (default
session settings for every model, so the comparison is like for like). onnxruntime's quantizer
gets the same fp32 graph after `quant_pre_process`, per-channel int8 weights, uint8 activations,
min-max calibration on the same training batches, in QOperator and QDQ format.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_onnx.py [--repeats 100] [--epochs-resnet 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def trained(name, data, epochs):
    from qadmm.train import TrainConfig, accuracy, seed_everything, train_epochs
    from qadmm.zoo import build_model

    seed_everything(0)
    m = build_model(name, data.input_shape, data.num_classes, data.mean, data.std)
    train_epochs(m, data, TrainConfig(epochs=epochs, lr=3e-3, batch_size=64, patience=epochs), progress=False)
    m.eval()
    return m, accuracy(m, data.x_test, data.y_test)


def artifact(model, data, bits, tmp, name):
    from qadmm.methods import ptq
    from qadmm.spec import QuantSpec
    from qexport.artifact import load_artifact, save_artifact
    from qexport.workflow import preprocessing

    res = ptq.quantize(model, data, QuantSpec(bits=bits, per_channel=True, progress=False))
    meta = {"architecture": {"model": name, "input_shape": list(data.input_shape), "num_classes": data.num_classes},
            "preprocessing": preprocessing(data), "dataset": data.describe(), "method": {"name": "ptq", "params": res.params},
            "spec": {"bits": bits, "scheme": "symmetric", "per_channel": True, "seed": 0}}
    p = tmp / f"{name}-{bits}.qx.safetensors"
    save_artifact(p, res.model, res.layers, meta)
    return load_artifact(p)


def ort_quantized(fp32_path: Path, x_train: np.ndarray, fmt: str, tmp: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / f"{fp32_path.stem}.pre.onnx"
    if not pre.exists():
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x_train[i * 64:(i + 1) * 64]} for i in range(8)])

        def get_next(self):
            return next(self.batches, None)

    out = tmp / f"{fp32_path.stem}.ort-{fmt}.onnx"
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def measure(path: Path, data, repeats: int, config=None) -> dict:
    from qexport.onnx.runner import latency, make_session, predict

    sess = make_session(str(path), "all", config or {}, threads=2)
    acc = float((predict(sess, data.x_test, 256).argmax(1) == data.y_test).mean() * 100)
    b1 = latency(sess, data.x_test, 1, repeats=repeats * 4, warmup=20).median_ms
    b64 = latency(sess, data.x_test, 64, repeats=repeats, warmup=5).median_ms
    return {"size": path.stat().st_size, "acc": acc, "b1": b1, "b64": b64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=60, help="timed runs at batch 64 (4x that at batch 1)")
    ap.add_argument("--epochs-mlp", type=int, default=3)
    ap.add_argument("--epochs-resnet", type=int, default=1)
    args = ap.parse_args()
    if not (DATA / "mnist").is_dir():
        sys.exit(f"mnist not found at {DATA}/mnist: place the project's shared/ folder beside the checkout")
    torch.set_num_threads(2)
    from qadmm.data import load_dataset
    from qexport.artifact import Artifact
    from qexport.onnx.export import export_onnx
    from qexport.onnx.runner import faithful_config

    data = load_dataset("mnist-10k", DATA, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    rows = []
    for name, epochs in (("mlp-mnist", args.epochs_mlp), ("resnet20", args.epochs_resnet)):
        t0 = time.time()
        model, float_acc = trained(name, data, epochs)
        print(f"# {name}: float test accuracy {float_acc:.2f}% after {epochs} epoch(s), {time.time() - t0:.0f} s", flush=True)
        a8 = artifact(model, data, 8, tmp, name)
        fp32 = Artifact(model, {}, a8.meta, "float")  # no quantized layers: the fp32 graph, same builder
        paths = {"fp32": tmp / f"{name}.fp32.onnx"}
        onnx.save(export_onnx(fp32, "weights"), str(paths["fp32"]))
        for bits in (2, 4, 8):
            a = a8 if bits == 8 else artifact(model, data, bits, tmp, name)
            p = tmp / f"{name}.weights{bits}.onnx"
            onnx.save(export_onnx(a, "weights"), str(p))
            paths[f"qexport weights {bits}b"] = p
        for form in ("qdq", "qoperator"):
            p = tmp / f"{name}.{form}8.onnx"
            onnx.save(export_onnx(a8, form, data.x_train), str(p))
            paths[f"qexport {form} 8b"] = p
            paths[f"ort {form} 8b"] = ort_quantized(paths["fp32"], data.x_train, form, tmp)
        res = {k: measure(p, data, args.repeats) for k, p in paths.items()}
        for form in ("qdq", "qoperator"):  # the exact-arithmetic setting on this CPU (see docs/onnx.md)
            p = paths[f"qexport {form} 8b"]
            res[f"qexport {form} 8b +x64quantprecision"] = measure(p, data, args.repeats, faithful_config(onnx.load(str(p))))
        base = res["fp32"]
        for k, r in res.items():
            ort_ref = res.get(f"ort {k.split()[1]} 8b") if k.startswith("qexport q") else None
            rows.append((name, k, r["size"] / 1024, r["size"] / base["size"], r["acc"], r["b1"], r["b64"],
                         base["b1"] / r["b1"], base["b64"] / r["b64"],
                         (ort_ref["b64"] / r["b64"]) if ort_ref else float("nan")))
    print(f"\n{'model':10s} {'graph':34s} {'KB':>8s} {'size/fp32':>9s} {'acc%':>6s} {'b1 ms':>7s} {'b64 ms':>7s} "
          f"{'fp32/x b1':>9s} {'fp32/x b64':>10s} {'ort/x b64':>9s}")
    for r in rows:
        print(f"{r[0]:10s} {r[1]:34s} {r[2]:8.1f} {r[3]:9.3f} {r[4]:6.2f} {r[5]:7.3f} {r[6]:7.3f} {r[7]:9.2f} {r[8]:10.2f} {r[9]:9.2f}")
    print("\nfp32/x: speed-up over the fp32 graph (>1 = faster); ort/x b64: onnxruntime quantize_static's latency in the "
          "same format over ours (>=1 = ours no slower). Median of runs, 2 threads, ORT_ENABLE_ALL, default session settings.")


if __name__ == "__main__":
    main()
