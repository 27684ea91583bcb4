"""The torchvision and timm zoos through qexport, beside onnxruntime's own quantizer, in one run.

Each model of benchmarks/zoo_models.py (3×64×64 input, 10 classes, seeded random weights) is
calibrated on real Fashion-MNIST images (resized to 64×64, grey copied to 3 channels, scaled to
[0, 1]); BatchNorm's running statistics are those of the calibration images themselves, computed
as quantization re-estimates them, as a trained network's are those of its training data. A
random-weight net is chaotic in its statistics: from any other sample its output moves with the
sample (efficientnet_b0's fp32 output: 10.5 dB SQNR after re-estimating on 512 of the 576 images its
statistics came from), and agreement would measure that rather than the quantization. Both tools
calibrate on the same 512 images; then, per model:

- onnxruntime: the fp32 ONNX from torch.onnx.export, `quant_pre_process`, `quantize_static` in QDQ
  and QOperator form (uint8 activations, int8 per-channel weights, MinMax): seconds per step and
  top-1 agreement and SQNR (dB) of each int8 graph against the PyTorch fp32 model on the test images;
- qexport, per `--runs` entry (method:bits, per channel): `quantize` (or its refusal, one line),
  then `to_onnx` and `verify` in every form: seconds, PASSED/FAILED (with the differing steps) and
  top-1 agreement and SQNR against the PyTorch fp32 model.
- the speed of every graph (fp32, onnxruntime's and qexport's int8 ones): median milliseconds per
  run at batch 1 and 32 under onnxruntime's default settings, every graph of a model timed in turns
  (`paired_speed`), and ours over onnxruntime's.

Lines go to `--out` (JSON Lines, one per model, appended as they finish; a re-run skips the models
already there) and two Markdown tables are printed at the end (`--table` prints them from `--out`).

    apt-get install dataset-fashion-mnist              # the calibration and test images
    pip install torchvision==0.28.0 timm              # beside torch==2.13.0 (see zoo_models.py)
    OMP_NUM_THREADS=2 python benchmarks/zoo.py --out runs/zoo.jsonl
    python benchmarks/zoo.py --models resnet18,mobilenet_v3_small --runs ptq:8 --out runs/zoo-small.jsonl
    python benchmarks/zoo.py --capture                 # only the capture of each model: how, seconds, exactness
    python benchmarks/zoo.py --runs ptq:8 --no-verify --out benchmarks/results/zoo-speed.jsonl   # the speeds alone
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from zoo_models import ZOO, build  # noqa: E402

FORMS = ("weights", "qdq", "qoperator")


def images(n_train: int, n_test: int, data_dir: str | None):
    """(x_train, y_train, x_test, y_test): Fashion-MNIST at 3×64×64 in [0, 1]."""
    from qadmm.data import load_dataset

    d = load_dataset("fashion-mnist", data_dir, seed=0)

    def prep(x):
        x = torch.as_tensor(np.asarray(x[:], np.float32)) / 255.0
        x = F.interpolate(x.reshape(-1, 1, 28, 28), size=(64, 64), mode="bilinear", align_corners=False)
        return x.repeat(1, 3, 1, 1).numpy()

    return prep(d.x_train[:n_train]), np.asarray(d.y_train[:n_train]), prep(d.x_test[:n_test]), np.asarray(d.y_test[:n_test])


def closeness(sess, x: np.ndarray, ref: np.ndarray) -> dict:
    """How close an onnxruntime session's outputs are to the fp32 reference's: top-1 agreement (%)
    and SQNR (dB). On random-weight nets the logits are often nearly tied, so top-1 agreement swings
    by points between two graphs of the same error; SQNR measures the error itself."""
    from qadmm.train import agreement

    out = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    a = agreement(torch.as_tensor(ref), torch.as_tensor(out), True)
    return {"agreement": round(a["top1_agreement"], 2), "sqnr_db": None if a["sqnr_db"] is None else round(a["sqnr_db"], 2)}


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def paired_speed(sessions: dict, x: np.ndarray, rounds: dict[int, int] | None = None) -> dict:
    """Median milliseconds per run at each batch size (`rounds`: batch size -> rounds, default 30 at
    batch 1 and 32) of every onnxruntime session of one model, timed in turns: each round runs every
    graph once, so that what else the machine does falls on all of them alike. (Timed one graph after
    another, the same file measured 0.76x and 1.31x onnxruntime's in two runs.)"""
    out: dict = {k: {} for k in sessions}
    for bs, n in (rounds or {1: 30, 32: 30}).items():
        feeds = {k: {s.get_inputs()[0].name: np.asarray(x[:bs], np.float32)} for k, s in sessions.items()}
        for k, s in sessions.items():
            for _ in range(3):
                s.run(None, feeds[k])
        times: dict = {k: [] for k in sessions}
        for _ in range(n):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
        for k, v in times.items():
            out[k][str(bs)] = round(float(np.median(v)) * 1000, 3)
    return out


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def onnxruntime_steps(model, x_train, x_test, ref, tmp: Path) -> dict:
    """torch.onnx.export → quant_pre_process → quantize_static (QDQ and QOperator)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rec: dict = {}
    fp32 = tmp / "fp32.onnx"
    t = time.perf_counter()
    try:
        torch.onnx.export(model, (torch.as_tensor(x_test[:1]),), str(fp32), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)
    except Exception as e:  # the exporter's own refusal, recorded as the step's result
        return {"export": {"ok": False, "error": first_line(e)}}
    rec["export"] = {"ok": True, "seconds": round(time.perf_counter() - t, 2), **closeness(session(fp32), x_test, ref),
                     "path": fp32}
    pre = tmp / "fp32.pre.onnx"
    t = time.perf_counter()
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    pre_seconds = time.perf_counter() - t

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x_train[i:i + 64]} for i in range(0, len(x_train), 64)])

        def get_next(self):
            return next(self.batches, None)

    for fmt in ("qdq", "qoperator"):
        out = tmp / f"ort-{fmt}.onnx"
        t = time.perf_counter()
        try:
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            seconds = round(time.perf_counter() - t + pre_seconds, 2)
            rec[fmt] = {"ok": True, "seconds": seconds, **closeness(session(out), x_test, ref), "path": out}
        except Exception as e:  # a file onnxruntime writes but cannot load counts as a failure of its pipeline
            rec[fmt] = {"ok": False, "error": first_line(e)}
    return rec


def qexport_steps(model, data, method: str, bits: int, calib: int, x_test, ref, tmp: Path, check: bool = True) -> dict:
    """quantize → to_onnx → verify in every form (without `check`, no verify: a run for the speeds)."""
    from qadmm.errors import UserError
    from qexport import api

    t = time.perf_counter()
    try:
        art = api.quantize(model, data, method, bits, per_channel=True, calib_samples=calib)
    except UserError as e:
        return {"quantize": {"ok": False, "error": str(e)}}
    rec = {"quantize": {"ok": True, "seconds": round(time.perf_counter() - t, 2)}}
    for form in FORMS:
        path = tmp / f"{method}{bits}-{form}.onnx"
        t = time.perf_counter()
        try:
            api.to_onnx(art, path, form, data if form != "weights" else None)
            export_s = time.perf_counter() - t
            rec[form] = {"ok": True, "export_seconds": round(export_s, 2), **closeness(session(path), x_test, ref), "path": path}
            if check:
                t = time.perf_counter()
                report = api.verify(path, art, data, max_samples=len(x_test))
                rec[form].update(verify_seconds=round(time.perf_counter() - t, 2), passed=report["passed"],
                                 runs={k: {kk: v[kk] for kk in ("passed", "max_steps", "max_steps_layerwise", "rel_error",
                                                                 "rel_allowed", "top1_agreement") if kk in v}
                                       for k, v in report.get("runs", {}).items()})
        except UserError as e:
            rec[form] = {"ok": False, "error": str(e)}
    return rec


def cell(r: dict | None, key: str = "seconds") -> str:
    if r is None:
        return ""
    if not r.get("ok"):
        return "✘ " + r.get("error", "")[:80].replace("|", "/")
    close = f"{r['agreement']}%" + (f", {r['sqnr_db']} dB" if r.get("sqnr_db") is not None else "") if "agreement" in r else ""
    if "passed" in r:
        return f"{'✔' if r['passed'] else '**FAILED**'} {close}"
    return f"✔ {r.get(key, '')} s" + (f", {close}" if close else "")


def table(lines: list[dict]) -> str:
    runs = sorted({k for rec in lines for k in rec["qexport"]})
    head = ["model", "ort export", "ort qdq", "ort qoperator"]
    for run in runs:
        head += [f"{run} quantize", *(f"{run} {f}" for f in FORMS)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in lines:
        o = rec["onnxruntime"]
        row = [rec["model"], cell(o.get("export")), cell(o.get("qdq")), cell(o.get("qoperator"))]
        for run in runs:
            q = rec["qexport"].get(run, {})
            row += [cell(q.get("quantize")), *(cell(q.get(f)) for f in FORMS)]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def speed_table(lines: list[dict], run: str = "ptq 8b") -> str:
    """Milliseconds per batch of 1 / 32 of every graph, and ours over onnxruntime's (same format)."""
    head = ["model", "fp32", "ort qdq", "ort qoperator", f"{run} qdq", f"{run} qoperator", "ours / ort (qdq, qop; b1 / b32)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in lines:
        o, q = rec["onnxruntime"], rec["qexport"].get(run, {})
        cells = [o.get("export"), o.get("qdq"), o.get("qoperator"), q.get("qdq"), q.get("qoperator")]
        ms = [c.get("ms") if c and c.get("ok") else None for c in cells]
        if not any(ms):
            continue
        row = [rec["model"], *(f"{m['1']:.2f} / {m['32']:.1f}" if m else "-" for m in ms)]
        ratios = [f"{a[b] / o_[b]:.2f}" for a, o_ in ((ms[3], ms[1]), (ms[4], ms[2])) if a and o_ for b in ("1", "32")]
        out.append("| " + " | ".join(row + [", ".join(ratios) or "-"]) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ZOO), help="comma-separated names of zoo_models.ZOO")
    ap.add_argument("--runs", default="ptq:8,gptq:4", help="qexport method:bits pairs, per channel")
    ap.add_argument("--calib", type=int, default=512, help="calibration images")
    ap.add_argument("--test", type=int, default=500, help="test images (agreement, verify)")
    ap.add_argument("--data-dir", default=None, help="where fashion-mnist/ is (default: the Debian package's folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "zoo.jsonl")
    ap.add_argument("--table", action="store_true", help="print the tables of --out and stop")
    ap.add_argument("--no-verify", action="store_true", help="skip verify (a run for the graphs' speeds)")
    ap.add_argument("--capture", action="store_true",
                    help="only capture each model (qexport.graph.trace): seconds, how, and max |Δ| of the graph vs the model")
    args = ap.parse_args()
    unknown = [m for m in args.models.split(",") if m not in ZOO]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(ZOO)}")
    done = [json.loads(s) for s in args.out.read_text().splitlines() if s.strip()] if args.out.is_file() else []
    if args.table:
        print(table(done))
        print()
        print(speed_table(done))
        return
    from qexport import api

    if args.capture:
        from qexport.graph import rebuilt, trace

        x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        for name in args.models.split(","):
            model = build(name, x=x)
            t = time.perf_counter()
            graph = trace(model, (3, 64, 64))
            seconds = time.perf_counter() - t
            with torch.no_grad():
                d = float((rebuilt(graph, model)(x) - model(x)).abs().max())
            print(f"{name}: {graph.source}, {seconds:.1f} s, {len(graph.ops)} ops, max |graph - model| = {d:.1e}", flush=True)
        return
    x_train, y_train, x_test, y_test = images(args.calib + 64, args.test, args.data_dir)
    data = api.as_dataset((x_train, y_train, x_test, y_test))
    calib = data.calibration(args.calib)  # the images qexport calibrates on; onnxruntime calibrates on them too
    runs = [(m, int(b)) for m, b in (r.split(":") for r in args.runs.split(","))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        if any(d["model"] == name for d in done):
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        model = build(name, x=calib)  # BatchNorm statistics of the calibration images
        with torch.no_grad():
            ref = torch.cat([model(torch.as_tensor(x_test[i:i + 64])) for i in range(0, len(x_test), 64)]).numpy()
        rec = {"model": name, "params": sum(p.numel() for p in model.parameters()), "onnxruntime": {}, "qexport": {}}
        with tempfile.TemporaryDirectory() as tmp:
            rec["onnxruntime"] = onnxruntime_steps(model, calib.numpy(), x_test, ref, Path(tmp))
            for method, bits in runs:
                rec["qexport"][f"{method} {bits}b"] = qexport_steps(model, data, method, bits, args.calib, x_test, ref, Path(tmp),
                                                                    check=not args.no_verify)
            steps = [rec["onnxruntime"], *rec["qexport"].values()]  # every graph written, timed in turns
            graphs = {(k, form): r.pop("path") for k, step in enumerate(steps) for form, r in step.items() if "path" in r}
            for (k, form), ms in paired_speed({g: session(p) for g, p in graphs.items()}, x_test).items():
                steps[k][form]["ms"] = ms
        print(json.dumps(rec), file=sys.stderr)
        with args.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        done.append(rec)
    print(table(done))
    print()
    print(speed_table(done))


if __name__ == "__main__":
    main()
