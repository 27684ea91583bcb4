"""Calibration under a concurrent load, side by side with onnxruntime's pipeline, in one run.

Each job runs in a fresh process on resnet18 (3x64x64, seeded weights, BatchNorm statistics of
the images) with 512 calibration images: qexport `quantize` (ptq 8-bit and gptq 4-bit, per
channel) and onnxruntime's pipeline (torch.onnx.export, quant_pre_process, quantize_static QDQ).
Each is timed on a quiet machine and beside a load (a second process multiplying matrices on one
thread, as another job would), and for qexport with OpenMP's waiting threads spinning (the
default) or sleeping (`OMP_WAIT_POLICY=PASSIVE`, what the `qexport` command sets unless told).
Reported: seconds and the slowdown under load of each, and qexport's time over onnxruntime's.

    python benchmarks/busy_machine.py --out benchmarks/results/busy-machine.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

JOB = r'''
import sys, time, tempfile, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {here!r}); sys.path.insert(0, {root!r})
import numpy as np, torch
from zoo_models import build
x = np.random.default_rng(0).random((600, 3, 64, 64), dtype=np.float32)
y = np.random.default_rng(1).integers(0, 10, 600)
model = build("resnet18", x=torch.as_tensor(x[:256]))
t = time.perf_counter()
if {what!r} == "onnxruntime":
    from pathlib import Path
    from zoo import onnxruntime_steps
    with tempfile.TemporaryDirectory() as tmp:
        ref = model(torch.as_tensor(x[512:])).detach().numpy()
        t = time.perf_counter()
        rec = onnxruntime_steps(model, x[:512], x[512:520], ref[:8], Path(tmp))
        assert rec["qdq"]["ok"], rec
else:
    from qexport import api
    from qadmm.data import from_arrays
    method, bits = {what!r}.split(":")
    api.quantize(model, from_arrays("r", x[:512], y[:512], x[512:], y[512:]), method, int(bits), per_channel=True,
                 calib_samples=512)
print(time.perf_counter() - t)
'''

LOAD = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()\n"


def run(what: str, env: dict) -> float:
    code = JOB.format(here=str(HERE), root=str(HERE.parent), what=what)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="onnxruntime,ptq:8,gptq:4")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    results: dict = {"cores": os.cpu_count(), "rows": []}
    for what in a.jobs.split(","):
        policies = ["default"] if what == "onnxruntime" else ["ACTIVE", "PASSIVE"]
        for policy in policies:
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            quiet = run(what, env)
            load = subprocess.Popen([sys.executable, "-c", LOAD], env={**os.environ, "OMP_NUM_THREADS": "1"})
            try:
                time.sleep(2)
                busy = run(what, env)
            finally:
                load.kill()
            row = {"job": what, "omp_wait_policy": policy, "quiet_s": round(quiet, 1), "busy_s": round(busy, 1),
                   "slowdown": round(busy / quiet, 2)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    ort = next(r for r in results["rows"] if r["job"] == "onnxruntime")
    for r in results["rows"]:
        r["vs_onnxruntime_quiet"] = round(r["quiet_s"] / ort["quiet_s"], 2)
        r["vs_onnxruntime_busy"] = round(r["busy_s"] / ort["busy_s"], 2)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print("| job | OMP_WAIT_POLICY | quiet | beside a load | slowdown | vs onnxruntime (quiet / busy) |")
    print("|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['job']} | {r['omp_wait_policy']} | {r['quiet_s']} s | {r['busy_s']} s | {r['slowdown']}x | "
              f"{r['vs_onnxruntime_quiet']}x / {r['vs_onnxruntime_busy']}x |")


if __name__ == "__main__":
    main()
