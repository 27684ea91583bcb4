"""Speed and size of qexport's ONNX files against fp32 ONNX and onnxruntime's own quantize_static.

Three models: the MNIST MLP (trained briefly on mnist-10k here), and the shipped Fashion-MNIST
checkpoints `models/fashion-cnn-small` and `models/fashion-resnet20`. For each, per-channel PTQ
artifacts, and in one process on one machine:

- fp32: the float model through qexport's exporter (no quantized layers);
- qexport `weights` 2/4/8 bit (Cast·α, the default) and 4 bit with `--dequant dequantizelinear`;
- qexport `qdq` and `qoperator` with 8-bit codes and with 7-bit codes (`--bits 7`);
- onnxruntime's `quantize_static` on the same fp32 graph after `quant_pre_process`: per-channel
  int8 weights, uint8 activations, min-max on the same 8x64 training images, QDQ and QOperator,
  and QOperator with `reduce_range` (7-bit weights).

Every session: 2 intra-op threads, ORT_ENABLE_ALL, *default* session settings (what a user's
runtime does); rows marked `+setting` add what `qexport run` adds on this CPU. Latency is the
median over interleaved rounds (every graph timed once per round, so drift hits all alike), at
batch 1 and 64. Ratios, not absolute times, are the result: fp32/x (speed-up over fp32) and
ort/x (onnxruntime's quantizer output in the same format over ours; > 1 = ours faster).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_onnx.py [--rounds 7] [--json runs/bench_onnx.json]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_onnx.py --models resnet20 --profile   # where the time goes
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

MODELS = {"mlp": ("mlp-mnist", "mnist-10k", None), "cnn-small": ("cnn-small", "fashion-mnist", "models/fashion-cnn-small.safetensors"),
          "resnet20": ("resnet20", "fashion-mnist", "models/fashion-resnet20.safetensors")}
# ours -> the onnxruntime-quantizer graph it is compared with
ORT_PEER = {"qexport qdq 8b": "ort qdq 8b", "qexport qoperator 8b": "ort qoperator 8b",
            "qexport qdq 7b": "ort qdq 8b", "qexport qoperator 7b": "ort qoperator 7b (reduce_range)"}


def float_model(key: str, epochs_mlp: int):
    from qadmm.data import load_dataset
    from qadmm.train import TrainConfig, seed_everything, train_epochs
    from qadmm.zoo import build_model
    from qexport.checkpoint import load_checkpoint

    zoo, ds, ckpt = MODELS[key]
    data = load_dataset(ds, DATA, seed=0)
    if ckpt:
        model, _ = load_checkpoint(ROOT / ckpt)
        return model.eval(), data
    seed_everything(0)
    m = build_model(zoo, data.input_shape, data.num_classes, data.mean, data.std)
    train_epochs(m, data, TrainConfig(epochs=epochs_mlp, lr=3e-3, batch_size=64, patience=epochs_mlp), progress=False)
    return m.eval(), data


def artifact(model, data, bits: int | None, tmp: Path, key: str):
    """A per-channel PTQ artifact (bits None: no quantized layers, the fp32 graph), saved and loaded."""
    from qexport import api

    path = tmp / f"{key}-{bits or 'fp32'}.qx.safetensors"
    art = api.quantize(model, data, "ptq", bits or 8, per_channel=True, exclude=["*"] if bits is None else ())
    art.save(path)
    return api.load(path)


def ort_quantized(fp32_path: Path, x_train: np.ndarray, fmt: str, reduce_range: bool, tmp: Path) -> Path:
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

    out = tmp / f"{fp32_path.stem}.ort-{fmt}{'-rr' if reduce_range else ''}.onnx"
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ,
                    per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def graphs(key: str, model, data, tmp: Path) -> dict[str, tuple[Path, dict]]:
    """name -> (ONNX path, session config) for every graph compared on this model."""
    from qexport import api
    from qexport.onnx.runner import faithful_config

    arts = {b: artifact(model, data, b, tmp, key) for b in (None, 2, 4, 7, 8)}
    out = {}

    def add(name, art, form, **kw):
        p = tmp / f"{key}.{name.replace(' ', '_')}.onnx"
        m = api.to_onnx(art, p, form, data if form != "weights" else None, **kw)
        out[name] = (p, {})
        cfg = faithful_config(m)
        if cfg:
            out[f"{name} +setting"] = (p, cfg)

    add("fp32", arts[None], "weights")
    for b in (2, 4, 8):
        add(f"qexport weights {b}b", arts[b], "weights")
    add("qexport weights 4b dequantizelinear", arts[4], "weights", dequant="dequantizelinear")
    for b in (8, 7):
        for form in ("qdq", "qoperator"):
            add(f"qexport {form} {b}b", arts[b], form)
    fp32 = out["fp32"][0]
    out["ort qdq 8b"] = (ort_quantized(fp32, data.x_train, "qdq", False, tmp), {})
    out["ort qoperator 8b"] = (ort_quantized(fp32, data.x_train, "qoperator", False, tmp), {})
    out["ort qoperator 7b (reduce_range)"] = (ort_quantized(fp32, data.x_train, "qoperator", True, tmp), {})
    return out


def timed(sess, xb: np.ndarray, runs: int) -> list[float]:
    name = sess.get_inputs()[0].name
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: xb})
        t.append((time.perf_counter() - t0) * 1000)
    return t


def measure(paths: dict[str, tuple[Path, dict]], data, rounds: int, runs: int, acc_samples: int) -> dict[str, dict]:
    from qexport.onnx.runner import fit_input, make_session, predict

    sess = {k: make_session(str(p), "all", cfg, threads=2) for k, (p, cfg) in paths.items()}
    x, y = data.x_test[:acc_samples], data.y_test[:acc_samples]
    res = {k: {"size": p.stat().st_size, "acc": float((predict(sess[k], x, 256).argmax(1) == y).mean() * 100),
               "config": cfg} for k, (p, cfg) in paths.items()}
    for bs in (1, 64):
        xb = fit_input(next(iter(sess.values())), data.x_test[:bs])
        times: dict[str, list[float]] = {k: [] for k in sess}
        for k in sess:
            timed(sess[k], xb, 10)  # warm-up
        for _ in range(rounds):
            for k in sess:
                times[k] += timed(sess[k], xb, runs * (4 if bs == 1 else 1))
        for k in sess:
            res[k][f"b{bs}"] = float(np.median(times[k]))
    return res


def cpu_line() -> str:
    import onnxruntime as ort

    from qexport.cpu import cpu_has_vnni

    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").is_file() else platform.processor()
    vnni = {True: "VNNI", False: "no VNNI (AVX2 u8·s8 kernels saturate)", None: "not x86"}[cpu_has_vnni()]
    return f"CPU: {name}, {vnni}; onnxruntime {ort.__version__}, 2 intra-op threads, ORT_ENABLE_ALL"


def table(rows: list[dict]) -> str:
    head = ("| model | graph | KB | size / fp32 | acc % | fp32/x b1 | fp32/x b64 | ort/x b1 | ort/x b64 |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        f = (lambda v: f"{v:.2f}" if v is not None else "—")
        lines.append(f"| {r['model']} | {r['graph']} | {r['size'] / 1024:.1f} | {r['size_ratio']:.3f} | {r['acc']:.2f} | "
                     f"{f(r['fp32_b1'])} | {f(r['fp32_b64'])} | {f(r.get('ort_b1'))} | {f(r.get('ort_b64'))} |")
    return "\n".join(lines)


def profile_both(paths, data, key: str) -> None:
    """Per-op-type kernel time at batch 1: ours vs onnxruntime's quantizer (QOperator, 8-bit)."""
    from qexport.cli.onnx import format_profile
    from qexport.onnx.runner import profile

    for name in ("qexport qoperator 8b", "ort qoperator 8b", "qexport qoperator 7b", "ort qoperator 7b (reduce_range)"):
        p, cfg = paths[name]
        print(f"\n## {key}: {name}, batch 1")
        print(format_profile(profile(p.read_bytes(), data.x_test, 1, "all", cfg, threads=2, repeats=300), 8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn-small,resnet20")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds; each times every graph")
    ap.add_argument("--runs", type=int, default=10, help="runs per graph per round at batch 64 (4x at batch 1)")
    ap.add_argument("--acc-samples", type=int, default=2000)
    ap.add_argument("--epochs-mlp", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also print the per-node profile of the QOperator graphs")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    if not (DATA / "mnist").is_dir():
        sys.exit(f"mnist not found at {DATA}/mnist: place the project's shared/ folder beside the checkout")
    torch.set_num_threads(2)
    print(cpu_line(), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    rows = []
    for key in args.models.split(","):
        t0 = time.time()
        model, data = float_model(key, args.epochs_mlp)
        paths = graphs(key, model, data, tmp)
        res = measure(paths, data, args.rounds, args.runs, args.acc_samples)
        print(f"# {key}: {len(paths)} graphs measured in {time.time() - t0:.0f} s", flush=True)
        base = res["fp32"]
        for name, r in res.items():
            peer = res.get(ORT_PEER.get(name.replace(" +setting", "")))
            rows.append({"model": key, "graph": name, **r, "size_ratio": r["size"] / base["size"],
                         "fp32_b1": base["b1"] / r["b1"], "fp32_b64": base["b64"] / r["b64"],
                         "ort_b1": peer["b1"] / r["b1"] if peer else None, "ort_b64": peer["b64"] / r["b64"] if peer else None})
        if args.profile:
            profile_both(paths, data, key)
    print()
    print(cpu_line())
    print(table(rows))
    print("\nfp32/x: the fp32 graph's median latency over this graph's (> 1 = faster than fp32). ort/x: the latency of "
          "onnxruntime quantize_static's graph in the same format (7-bit qoperator: its reduce_range graph) over ours "
          "(> 1 = ours faster). `+setting`: with the session setting `qexport run` adds on this CPU.")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_line(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
