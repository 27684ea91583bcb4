"""Do qexport's ONNX files load in an older onnxruntime (1.17.3), and compute the same there?

Opt-in: it needs PyPI once, to build a separate venv with `onnxruntime==1.17.3` and `numpy<2`
(`--venv DIR`, default `.venv-ort117`, gitignored; reused when it already has that release;
`--onnxruntime X.Y.Z` checks another release, in `.venv-ortXY`). When that venv cannot be built
(no network) it prints `skipped: …` and exits 0.

With the current qexport it quantizes (PTQ, per channel, calibration only) the digits MLP
(models/digits-mlp.safetensors, on digits) and the Fashion-MNIST cnn-small and ResNet-20
(models/fashion-*.safetensors; the data from `--data-dir`, else `$QEXPORT_DATA`, ./data or
/usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist) at 1, 2, 4 and 8
bits, and exports each in every form at the default opset and at the lowest opset the graph can
be written at (`qexport.min_opset`, 13 here; the integer forms' default already is 13). Every file
runs on the same `--samples` test inputs in the current onnxruntime (in this process) and in the
old one (a subprocess of the old venv's python, one per file, so a crash costs one row), with
optimisations all on (plus the session settings `qexport run`/`verify` add on this CPU,
`runner.faithful_config`) and off, as `qexport verify` runs them. A file the old runtime refuses
gets onnxruntime's own error text; one it loads is compared with the current runtime's outputs:
max |Δ| and, for the integer forms, how many uint8 output values differ (|Δ| in output steps).

    .venv/bin/python benchmarks/old_onnxruntime.py                      # writes benchmarks/reports/old-onnxruntime.md
    .venv/bin/python benchmarks/old_onnxruntime.py --models mlp --bits 4 -o /tmp/t.md --venv /tmp/ort117
    .venv/bin/python benchmarks/old_onnxruntime.py --onnxruntime 1.22.1 --models mlp -o /tmp/ort122.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OLD = "1.17.3"


def pins(version: str) -> list[str]:
    return [f"onnxruntime=={version}", "numpy<2"]  # 1.17 wheels are built against numpy 1.x
MODELS = {"mlp": ("models/digits-mlp.safetensors", "digits"), "cnn-small": ("models/fashion-cnn-small.safetensors", "fashion-mnist"),
          "resnet20": ("models/fashion-resnet20.safetensors", "fashion-mnist")}
FORMS = ("weights", "qdq", "qoperator")
LEVELS = {"all": "ORT_ENABLE_ALL", "off": "ORT_DISABLE_ALL"}  # runner.LEVELS "all" / "disable", as verify runs them

# Runs in the old venv (no qexport, no torch there): one file, both optimisation levels, as
# `runner.make_session` builds its sessions (one thread here, to stay light on a shared machine).
CHILD = r"""
import json, sys
import numpy as np, onnxruntime as ort
job = json.loads(sys.argv[1])
x = np.load(job["input"])
res = {"onnxruntime": ort.__version__, "runs": {}}
for level, spec in job["levels"].items():
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, spec["level"])
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for k, v in spec["config"].items():
        so.add_session_config_entry(k, v)
    try:
        sess = ort.InferenceSession(job["model"], so, providers=["CPUExecutionProvider"])
    except Exception as e:
        res["runs"][level] = {"loads": False, "error": str(e)}
        continue
    try:
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    except Exception as e:
        res["runs"][level] = {"loads": True, "error": str(e)}
        continue
    out = job["output"] + "." + level + ".npy"
    np.save(out, y)
    res["runs"][level] = {"loads": True, "output": out}
print(json.dumps(res))
"""


def old_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def installed(venv: Path) -> str | None:
    """The onnxruntime release the venv has, None when it has none (or no python)."""
    py = old_python(venv)
    if not py.is_file():
        return None
    r = subprocess.run([str(py), "-c", "import numpy, onnxruntime; print(onnxruntime.__version__)"], capture_output=True,
                       text=True, timeout=300)
    return r.stdout.strip() if r.returncode == 0 else None


def ensure_venv(venv: Path, version: str) -> str | None:
    """Create or reuse the old-runtime venv; None when ready, else why it could not be built.
    A venv this call created and could not finish is removed, so the next run starts clean."""
    if installed(venv) == version:
        return None
    created = not venv.exists()
    try:
        if created:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True, timeout=300)
        r = subprocess.run([str(old_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins(version)],
                           capture_output=True, text=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        r = None
        why = f"{type(e).__name__}: {getattr(e, 'stderr', '') or e}"
    if r is not None:
        if r.returncode == 0 and installed(venv) == version:
            return None
        lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        why = lines[-1].strip() if lines else f"pip exited with status {r.returncode}"
    if created:
        shutil.rmtree(venv, ignore_errors=True)
    return why


def short_error(text: str) -> str:
    """onnxruntime's message without its source path and C++ signature, on one line."""
    text = " ".join(text.split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed:", "", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ (?:\S+::)*\S+\(.*?\) ", "", text)  # file:line and the function signature
    text = re.sub(r"/onnxruntime_src/\S+:\d+ \S+ ", "", text)
    return text.strip()


def output_step(model) -> float | None:
    """The output's quantization step (integer forms: the scale of the last DequantizeLinear)."""
    from onnx import numpy_helper

    from qexport.ops.base import OUTPUT

    inits = {t.name: t for t in model.graph.initializer}
    last = next((n for n in model.graph.node if OUTPUT in n.output and n.op_type == "DequantizeLinear"), None)
    return float(numpy_helper.to_array(inits[last.input[1]])) if last is not None and last.input[1] in inits else None


def run_current(model, x: np.ndarray) -> dict[str, np.ndarray]:
    from qexport.onnx.runner import faithful_config, make_session

    out = {}
    for level, runner_level in (("all", "all"), ("off", "disable")):
        sess = make_session(model.SerializeToString(), runner_level, faithful_config(model) if level == "all" else {}, threads=1)
        out[level] = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return out


def run_old(venv: Path, path: Path, x_path: Path, config: dict[str, str]) -> dict:
    job = {"model": str(path), "input": str(x_path), "output": str(path.with_suffix("")),
           "levels": {level: {"level": name, "config": config if level == "all" else {}} for level, name in LEVELS.items()}}
    r = subprocess.run([str(old_python(venv)), "-c", CHILD, json.dumps(job)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        return {"runs": {level: {"loads": False, "error": f"the process died: {tail}"} for level in LEVELS}}
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(new: np.ndarray, old: np.ndarray, step: float | None) -> dict:
    d = np.abs(new.astype(np.float64) - old.astype(np.float64))
    row = {"max_abs": float(d.max()), "same": bool(d.max() == 0),
           "rel": float(d.max() / max(float(np.abs(new).max()), 1e-30))}  # verify's measure for `weights`
    if step:  # dequantized uint8 outputs: |Δ| is a whole number of steps up to float rounding
        steps = np.rint(d / step)
        row["values_differing"] = int((steps > 0).sum())
        row["max_steps"] = int(steps.max())
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnxruntime", default=OLD, metavar="X.Y.Z", help=f"the older release to check (default {OLD})")
    p.add_argument("--venv", type=Path, default=None, help="its venv (default .venv-ortXY; created if missing)")
    p.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "reports" / "old-onnxruntime.md")
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS), help="comma separated: " + ",".join(MODELS))
    p.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--samples", type=int, default=300, help="test inputs every file runs on")
    p.add_argument("--data-dir", default=None, help="folder with <dataset>/ (default: $QEXPORT_DATA, ./data, then system paths)")
    a = p.parse_args()
    unknown = [m for m in a.models if m not in MODELS]
    if unknown:
        print(f"error: unknown model {unknown[0]!r}: use {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if not all(1 <= b <= 8 for b in a.bits) or a.samples < 1:
        print("error: --bits takes widths from 1 to 8 and --samples a positive count", file=sys.stderr)
        return 2

    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", a.onnxruntime):
        print(f"error: --onnxruntime {a.onnxruntime!r}: give a release such as {OLD}", file=sys.stderr)
        return 2
    old = a.onnxruntime
    a.venv = a.venv or ROOT / (".venv-ort" + "".join(old.split(".")[:2]))
    why = ensure_venv(a.venv, old)
    if why is not None:
        print(f"skipped: cannot build the onnxruntime {old} venv at {a.venv} ({why}); it needs PyPI once "
              f"(pip install {' '.join(pins(old))}), then it is reused", file=sys.stderr)
        return 0

    import onnxruntime
    import torch

    import qexport
    from qadmm.data import load_dataset
    from qadmm.errors import UserError
    from qexport.checkpoint import load_checkpoint
    from qexport.onnx.compat import release_key, requirement
    from qexport.onnx.runner import faithful_config

    torch.set_num_threads(1)
    rows: list[dict] = []
    skipped: list[str] = []
    errors: dict[str, set[str]] = {}  # onnxruntime's refusal -> the files it refused with it
    datasets: dict[str, object] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="old-ort-") as tmp:
        tmp = Path(tmp)
        for name in a.models:
            ckpt, data_name = MODELS[name]
            if data_name not in datasets:
                try:
                    datasets[data_name] = load_dataset(data_name, a.data_dir, seed=0)
                except UserError as e:
                    skipped.append(f"{name}: {data_name} not found ({str(e).splitlines()[0]}); "
                                   "apt-get install dataset-fashion-mnist, or --data-dir")
                    continue
            data = datasets[data_name]
            x = np.ascontiguousarray(data.x_test[:a.samples], dtype=np.float32)
            x_path = tmp / f"{data_name}.npy"
            np.save(x_path, x)
            model, _ = load_checkpoint(ROOT / ckpt)
            for bits in a.bits:
                from qexport.provenance import Provenance

                art = qexport.quantize(model, data, "ptq", bits, per_channel=True, calib_samples=512,
                                       provenance=Provenance(model_name=name))
                for form in FORMS:
                    default = qexport.to_onnx(art, None, form, data)
                    lowest = requirement(default).lowest_opset
                    opsets = [None] if lowest == default.opset_import[0].version else [None, lowest]
                    for opset in opsets:
                        m = default if opset is None else qexport.to_onnx(art, None, form, data, opset=opset)
                        path = tmp / f"{name}-{bits}-{form}-{opset or 'default'}.onnx"
                        path.write_bytes(m.SerializeToString())
                        new = run_current(m, x)
                        then = run_old(a.venv, path, x_path, faithful_config(m))
                        req = requirement(m)
                        v = m.opset_import[0].version
                        predicted = req.onnxruntime is not None and release_key(req.onnxruntime) <= release_key(old)
                        row = {"model": name, "form": form, "bits": bits, "opset": f"{v}" + (" (default)" if opset is None else ""),
                               "ir": m.ir_version, "needs": req.onnxruntime, "predicted": predicted, "runs": {}}
                        for level in LEVELS:
                            run = then["runs"][level]
                            if "output" in run:
                                row["runs"][level] = {"loads": True, **compare(new[level], np.load(run["output"]), output_step(m))}
                            else:
                                err = short_error(run["error"])
                                errors.setdefault(err, set()).add(path.stem)
                                row["runs"][level] = {"loads": run["loads"], "error": err}
                        rows.append(row)
                        print(line(row), flush=True)
    report = render(rows, skipped, errors, onnxruntime.__version__, time.time() - t0, a)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(report, encoding="utf-8")
    print(f"\nwrote {a.output}")
    return 0


def line(r: dict) -> str:
    """One Markdown table row."""
    runs = r["runs"]
    loads = "yes" if all(run["loads"] and "error" not in run for run in runs.values()) else "**no**"
    if loads == "yes":
        same = " / ".join("yes" if runs[lv]["same"] else "**no**" for lv in LEVELS)
        diff = " / ".join(f"{runs[lv]['max_abs']:.3g}" for lv in LEVELS)
        steps = (" / ".join(f"{runs[lv]['values_differing']} ({runs[lv]['max_steps']})" for lv in LEVELS)
                 if "values_differing" in runs["all"] else " / ".join(f"rel {runs[lv]['rel']:.1g}" for lv in LEVELS))
    else:
        same = diff = steps = "—"
    agree = "" if r["predicted"] == (loads == "yes") else " (to-onnx said otherwise!)"
    return (f"| {r['model']} | {r['form']} | {r['bits']} | {r['opset']} | {r['ir']} | {r['needs']} | {loads}{agree} | "
            f"{same} | {diff} | {steps} |")


def render(rows: list[dict], skipped: list[str], errors: dict[str, set[str]], current: str, seconds: float, a) -> str:
    old = a.onnxruntime
    cmd = "python benchmarks/old_onnxruntime.py" + "".join(
        f" {flag} {val}" for flag, val, default in (("--onnxruntime", old, OLD), ("--models", ",".join(a.models), ",".join(MODELS)),
                                                    ("--bits", ",".join(map(str, a.bits)), "1,2,4,8"),
                                                    ("--samples", str(a.samples), "300")) if val != default)
    n_load = sum(all(run["loads"] and "error" not in run for run in r["runs"].values()) for r in rows)
    n_same = sum(all(run.get("same") for run in r["runs"].values()) for r in rows)
    mismatched = [r for r in rows if r["predicted"] != all(run["loads"] and "error" not in run for run in r["runs"].values())]
    out = [
        f"# qexport's ONNX files in onnxruntime {old}",
        "",
        f"`{cmd}` (qexport {__import__('qexport').__version__}, current onnxruntime {current}, old onnxruntime {old} in a "
        f"separate venv; {platform.machine()}, {a.samples} test inputs per file, {seconds:.0f} s).",
        "PTQ per channel; every form at the default opset and at the lowest the graph can be written at. "
        "Both runtimes run each file with optimisations all on (with `runner.faithful_config`'s settings for this CPU) "
        "and off. *needs*: the oldest onnxruntime `to-onnx` says loads the file (`qexport.onnx.compat`). "
        "*same / max abs diff*: old vs current outputs (all / off); *differing*: integer forms, the uint8 output values that "
        "differ (the largest difference in steps); `weights`, max |Δ| / max |output| (what `verify` bounds by 1e-5).",
        "",
        f"{n_load} of {len(rows)} files load in {old}; {n_same} of {len(rows)} give outputs identical to onnxruntime "
        f"{current}'s at both optimisation levels; the prediction of `to-onnx` "
        + ("matches every row." if not mismatched else f"is wrong for {len(mismatched)} rows."),
        "",
        f"| model | form | bits | opset | IR | needs | loads in {old} | same outputs (all / off) | max abs diff (all / off) "
        "| differing (all / off) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[line(r) for r in rows],
    ]
    if errors:
        out += ["", f"What onnxruntime {old} says when it refuses a file:", ""]
        out += [f"- `{err}` ({len(files)} files)" for err, files in sorted(errors.items(), key=lambda kv: -len(kv[1]))]
    if skipped:
        out += ["", "Not run:", "", *[f"- {s}" for s in skipped]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
