"""CNN quantization side by side: our back-ends and Brevitas's PTQ on the shipped Fashion-MNIST CNNs.

For each model (from models/fashion-<model>.safetensors), bit width and seed: accuracy on the 10k
Fashion-MNIST test images, drop from the float model, and wall time of the quantization alone.
Everything is per-channel (binary at 1 bit); calibration sets are `--calib-samples` training images
drawn by the seed, the same images for our methods and for Brevitas.

Methods (`--methods`, comma separated):
  ptq-nobn            nearest rounding (alternating α/Q fit), BatchNorm statistics left stale
  ptq                 the same + BatchNorm re-estimation (the default of `qexport quantize --method ptq`)
  ptq-bc              ... + bias correction (Nagel et al. 2019) as well
  gptq, ldnq          calibration-only back-ends, defaults (BatchNorm re-estimated, bias correction)
  gptq-nobc           gptq without the bias correction
  lq, ste             training back-ends; hyperparameters from --lq-params / --ste-params
  brevitas-nearest, brevitas-gptq, brevitas-gpfq
                      Brevitas 0.13 weight-only PTQ (benchmarks/brevitas_peer.py, MSE scales, bias
                      correction on, BatchNorm folded); needs `pip install -e '.[bench]'`

    OMP_NUM_THREADS=2 python benchmarks/cnn_ptq.py --models cnn-small --bits 8,4,3,2,1 \
        --methods ptq-nobn,ptq,gptq,ldnq,brevitas-gptq,brevitas-gpfq --seeds 3 --out runs/cnn_ptq.json

Results are appended to --out as they come (a re-run skips rows already there) and printed as a
markdown table of mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qadmm import methods  # noqa: E402
from qadmm.data import load_dataset  # noqa: E402
from qadmm.spec import QuantSpec  # noqa: E402
from qadmm.train import accuracy  # noqa: E402
from qexport.checkpoint import load_checkpoint  # noqa: E402
from qexport.cli.main import parse_params  # noqa: E402

# name -> (back-end, QuantSpec overrides)
OURS = {
    "ptq-nobn": ("ptq", {"bn_reestimate": False}),
    "ptq": ("ptq", {}),
    "ptq-bc": ("ptq", {"bias_correction": True}),
    "gptq-nobc": ("gptq", {"bias_correction": False}),
    "gptq": ("gptq", {}),
    "ldnq": ("ldnq", {}),
    "lq": ("lq", {}),
    "ste": ("ste", {}),
}


def run_one(method: str, model, data, bits: int, seed: int, a) -> tuple[float, float, list | None]:
    """Quantize once; returns (test accuracy %, seconds of quantization, the method's per-layer log)."""
    if method.startswith("brevitas-"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from brevitas_peer import brevitas_ptq

        x = data.calibration(a.calib_samples, seed)
        t0 = time.time()
        qm = brevitas_ptq(model, x, bits, method.split("-", 1)[1], bias_correction=True, scale="mse")
        seconds = time.time() - t0
        return accuracy(qm, data.x_test, data.y_test), seconds, None
    name, over = OURS[method]
    params = {"lq": parse_params(tuple(a.lq_params)), "ste": parse_params(tuple(a.ste_params))}.get(name, {})
    spec = QuantSpec(bits=bits, per_channel=True, seed=seed, calib_samples=a.calib_samples, params=params,
                     progress=a.progress, **over)
    t0 = time.time()
    res = methods.quantize(name, model, data, spec)
    seconds = time.time() - t0
    return accuracy(res.model, data.x_test, data.y_test), seconds, res.history


def label(r: dict) -> str:
    """A method's column name: its name, plus the hyperparameters given on the command line."""
    params = r.get("lq_params") or r.get("ste_params") or []
    return r["method"] + (f" ({' '.join(params)})" if params else "")


def table(rows: list[dict], floats: dict[str, float]) -> str:
    """Markdown, one table per model: bits down, methods across; mean ± std over seeds (drop from
    float in brackets), and the mean seconds per run below."""
    out = []
    for model in floats:
        mine = [r for r in rows if r["model"] == model]
        methods_ = list(dict.fromkeys(label(r) for r in mine))
        out += [f"\n{model}: float {floats[model]:.2f} %, test % (drop), mean ± std over seeds",
                "| bits | " + " | ".join(methods_) + " |", "|---|" + "---|" * len(methods_)]
        for bits in sorted({r["bits"] for r in mine}, reverse=True):
            cells = []
            for m in methods_:
                accs = [r["acc"] for r in mine if r["bits"] == bits and label(r) == m]
                sd = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
                cells.append(f"{statistics.mean(accs):.2f}{sd} ({floats[model] - statistics.mean(accs):.2f})" if accs else "")
            out.append(f"| {bits} | " + " | ".join(cells) + " |")
        secs = [statistics.mean([r["seconds"] for r in mine if label(r) == m]) for m in methods_]
        out.append("| s/run | " + " | ".join(f"{t:.1f}" for t in secs) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn-small,resnet20")
    ap.add_argument("--bits", default="8,4,3,2,1")
    ap.add_argument("--methods", default="ptq-nobn,ptq,gptq,ldnq,brevitas-gptq,brevitas-gpfq")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=2048)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--models-dir", default=str(ROOT / "models"))
    ap.add_argument("--lq-params", nargs="*", default=[], metavar="NAME=VALUE")
    ap.add_argument("--ste-params", nargs="*", default=[], metavar="NAME=VALUE")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "cnn_ptq.json"))
    ap.add_argument("--report", action="store_true", help="Only print the table of what --out holds.")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.is_file() else []
    if a.report:
        wanted = [r for r in rows if r["model"] in a.models.split(",") and r["method"] in a.methods.split(",")
                  and r["bits"] in map(int, a.bits.split(","))]
        print(table(wanted, {r["model"]: r["float"] for r in wanted}))
        return
    data = load_dataset("fashion-mnist", a.data_dir, seed=0)
    floats = {}
    for model_name in a.models.split(","):
        model, meta = load_checkpoint(Path(a.models_dir) / f"fashion-{model_name}.safetensors")
        model.eval()
        floats[model_name] = accuracy(model, data.x_test, data.y_test)
        print(f"{model_name}: float test {floats[model_name]:.2f}%", flush=True)
        for bits in map(int, a.bits.split(",")):
            for method in a.methods.split(","):
                for seed in range(a.seeds):
                    key = dict(model=model_name, method=method, bits=bits, seed=seed, calib_samples=a.calib_samples,
                               lq_params=a.lq_params if method == "lq" else [], ste_params=a.ste_params if method == "ste" else [])
                    if any(all(r.get(k) == v for k, v in key.items()) for r in rows):
                        continue
                    acc, seconds, history = run_one(method, model, data, bits, seed, a)
                    row = {**key, "acc": acc, "float": floats[model_name], "seconds": round(seconds, 2),
                           "threads": torch.get_num_threads(), "history": history}
                    rows.append(row)
                    out.write_text(json.dumps(rows, indent=1))
                    print(f"  {model_name} {method:16s} {bits}b seed {seed}: {acc:6.2f}%  "
                          f"(drop {floats[model_name] - acc:5.2f})  {seconds:6.1f} s", flush=True)
    wanted = [r for r in rows if r["model"] in floats and r["calib_samples"] == a.calib_samples]
    print(table(wanted, floats))


if __name__ == "__main__":
    main()
