"""Calibration-only quantization time beside onnxruntime's whole int8 pipeline, on a quiet and on a busy machine.

One model (default torchvision's resnet18 at 3×64×64, 10 classes, seeded weights, BatchNorm statistics
from the images), 512 Fashion-MNIST calibration images, per-channel weights. Timed, each in its own
process after the imports and the data are ready, so every step starts alike:

- `ort`: onnxruntime's pipeline: torch.onnx.export, `quant_pre_process`, `quantize_static` (QDQ,
  uint8 activations, int8 per-channel weights, MinMax);
- `ptq`: `qexport.quantize(model, data, "ptq", 8, per_channel=True)` (capture included);
- `gptq`: the same with gptq at 4 bits.

Each is run quiet and with one other job on the machine (a single-threaded float64 matrix product
in a loop, as a second training or test run would be), under torch's default threads and under the
variants given (`--variants`: `passive` sets OMP_WAIT_POLICY=PASSIVE, as the `qexport` command does
unless the variable is set, `shortspin` GOMP_SPINCOUNT=10000
(torch's OpenMP waits spinning 10,000 rounds, not 300,000, before it sleeps), `1thread` OMP_NUM_THREADS=1).
Rounds alternate the tools, so drift hits both alike; the table gives the median seconds, ours over
onnxruntime's, and loaded over quiet.

    python benchmarks/calib_speed.py --out benchmarks/results/calib-speed.json
    python benchmarks/calib_speed.py --tools ort,ptq --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "shortspin": {"GOMP_SPINCOUNT": "10000"},
            "1thread": {"OMP_NUM_THREADS": "1"}}
LOAD = ("import numpy as np\n"
        "a = np.random.default_rng(0).random((600, 600))\n"
        "while True:\n    a = a @ a.T; a /= np.abs(a).max()\n")


def child(tool: str, model_name: str, calib: int) -> float:
    """Seconds of one tool's run, measured after imports and data loading."""
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    from zoo import images
    from zoo_models import build

    x_train, y_train, x_test, y_test = images(calib + 64, 64, None)
    model = build(model_name, x=torch.as_tensor(x_train[:256]))
    if tool == "ort":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{"input": x_train[i:i + 64]} for i in range(0, calib, 64)])

            def get_next(self):
                return next(self.batches, None)

        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            torch.onnx.export(model, (torch.as_tensor(x_test[:1]),), f"{tmp}/fp32.onnx", dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17)
            quant_pre_process(f"{tmp}/fp32.onnx", f"{tmp}/pre.onnx", skip_symbolic_shape=True)
            quantize_static(f"{tmp}/pre.onnx", f"{tmp}/int8.onnx", Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            return time.perf_counter() - t
    from qexport import api

    data = api.as_dataset((x_train, y_train, x_test, y_test))
    method, bits = {"ptq": ("ptq", 8), "gptq": ("gptq", 4)}[tool]
    t = time.perf_counter()
    api.quantize(model, data, method, bits, per_channel=True, calib_samples=calib)
    seconds = time.perf_counter() - t
    return seconds


def run_child(tool: str, variant: str, args) -> float:
    env = {**os.environ, **VARIANTS[variant], "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, __file__, "--child", tool, "--model", args.model, "--calib", str(args.calib)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="a name of benchmarks/zoo_models.ZOO")
    ap.add_argument("--calib", type=int, default=512, help="calibration images")
    ap.add_argument("--tools", default="ort,ptq,gptq")
    ap.add_argument("--variants", default="default,passive", help=f"thread settings for qexport, of {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the medians and ratios here (JSON)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(child(args.child, args.model, args.calib))
        return
    tools = args.tools.split(",")
    runs = [(t, "default") for t in tools if t == "ort"] + [(t, v) for t in tools if t != "ort" for v in args.variants.split(",")]
    seconds: dict[str, list[float]] = {}
    for cond in ("quiet", "loaded"):
        load = subprocess.Popen([sys.executable, "-c", LOAD], env={**os.environ, "OMP_NUM_THREADS": "1",
                                "OPENBLAS_NUM_THREADS": "1"}) if cond == "loaded" else None
        try:
            for r in range(args.rounds):
                for tool, variant in runs:
                    s = run_child(tool, variant, args)
                    seconds.setdefault(f"{tool} {variant} {cond}", []).append(s)
                    print(f"{cond} round {r + 1}: {tool} ({variant}) {s:.1f} s", file=sys.stderr, flush=True)
        finally:
            if load is not None:
                load.kill()
                load.wait()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    rows = []
    print(f"| {args.model}, {args.calib} images, {os.cpu_count()} cores | quiet s | loaded s | loaded / quiet | quiet / ort | loaded / ort |")
    print("|---|---|---|---|---|---|")
    for tool, variant in runs:
        q, ld = med[f"{tool} {variant} quiet"], med[f"{tool} {variant} loaded"]
        oq, ol = med["ort default quiet"], med["ort default loaded"]
        rows.append({"tool": tool, "variant": variant, "quiet": round(q, 2), "loaded": round(ld, 2), "loaded_over_quiet": round(ld / q, 2),
                     "over_ort_quiet": round(q / oq, 2), "over_ort_loaded": round(ld / ol, 2)})
        name = "onnxruntime pipeline" if tool == "ort" else f"qexport {tool} ({variant})"
        print(f"| {name} | {q:.1f} | {ld:.1f} | {ld / q:.2f} | {q / oq:.2f} | {ld / ol:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "calib": args.calib, "cores": os.cpu_count(), "rounds": args.rounds,
                                        "seconds": seconds, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
