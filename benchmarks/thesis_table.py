"""Run quantization back-ends over datasets × bits × seeds and print mean ± std beside the thesis.

    python benchmarks/thesis_table.py --method ptq --datasets seeds,pendigits,mnist-10k \
        --bits 8,4,2,1 --scheme thesis --seeds 5 --data-dir ../shared/data
    python benchmarks/thesis_table.py --method all --datasets digits --scheme ours --seeds 3 \
        --epochs-budget 30 --int8-json torch_int8.json     # every back-end, one epoch budget
    python benchmarks/thesis_table.py --method gptq,ldnq,md-tanh --datasets fashion-mnist \
        --checkpoint models/fashion-cnn-small.safetensors --per-channel --bits 4,2 --seeds 1

`--method all` runs every registered back-end from the same float model per (dataset, seed);
`--epochs-budget N` gives every back-end that trains in epochs (ste, admm-q, proxquant, md-*,
askewsgd) the same N epochs and `lq` the same N passes over the training set (`budget_epochs`); `--checkpoint` uses a shipped float model instead of training one;
`--int8-json` adds the rows of benchmarks/torch_int8.py's JSON (PyTorch's own int8 paths).

Float models are trained once per (dataset, seed) and cached under --cache. The thesis columns come
from ../shared/reference/thesis_tables.json (Xue Ma 2023, Tables 6.3-6.7); the thesis's MNIST row used
all 60k training images, our `mnist-10k` only the official 10k test images split 8k/2k.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qadmm import methods  # noqa: E402
from qadmm.spec import QuantSpec  # noqa: E402
from qadmm.train import accuracy  # noqa: E402
from qexport.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from qexport.workflow import float_model, load_data, preprocessing  # noqa: E402

LR, BATCH, PATIENCE = 3e-3, 32, 30  # the CLI's float-training defaults
THESIS_JSON = ROOT.parent / "shared" / "reference" / "thesis_tables.json"
THESIS_NAME = {"ptq": "PTQ", "lq": "LQ", "qnn-admm": "QNN-ADMM", "ste": "QNN-STE"}
THESIS_DATASET = {"seeds": "seeds", "pendigits": "pendigits", "mnist": "mnist", "mnist-10k": "mnist",
                  "cifar10": "cifar10", "cifar100": "cifar100"}


def cached_float(data, ds: str, model_name: str | None, seed: int, cache: Path, epochs: int | None):
    cache.mkdir(parents=True, exist_ok=True)
    # the key names everything the float model depends on, so a changed recipe never reuses a stale model
    path = cache / f"float-{ds}-{model_name or 'default'}-s{seed}-e{epochs or 'auto'}-lr{LR}-b{BATCH}-p{PATIENCE}.safetensors"
    if path.is_file():
        model, meta = load_checkpoint(path)
        return model, meta["training"]
    model, name, info = float_model(data, model_name, None, seed, epochs, LR, BATCH, PATIENCE, progress=False)
    arch = {"model": name, "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    save_checkpoint(path, model, {"architecture": arch, "preprocessing": preprocessing(data), "training": info})
    return model, info


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} ± {sd:5.2f}"


def on_grid(rs: list[dict]) -> str:
    """Mean share of weights already on the grid before the final rounding (training-based methods)."""
    vals = [r["on_grid"] for r in rs if r.get("on_grid") is not None]
    return f"{100 * statistics.mean(vals):.0f}%" if vals else "-"


def print_int8(int8: Any, datasets: list[str]) -> None:
    """PyTorch's int8 rows (benchmarks/torch_int8.py --json) for the same datasets."""
    rows = int8.get("runs", int8) if isinstance(int8, dict) else int8
    print("\nPyTorch int8 (benchmarks/torch_int8.py), test %, mean ± std over seeds")
    print("| dataset | model | float | dynamic | static | qat |\n|---|---|---|---|---|---|")
    for ds in datasets:
        for model in sorted({r.get("model") for r in rows if r.get("dataset") == ds}):
            rs = [r for r in rows if r.get("dataset") == ds and r.get("model") == model]
            cells = [fmt([r[k] for r in rs if isinstance(r.get(k), (int, float))]) for k in ("float", "dynamic", "static", "qat")]
            print(f"| {ds} | {model} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="ptq", help="comma-separated registered methods, or all")
    ap.add_argument("--checkpoint", default=None, help="a qexport float checkpoint to start from (instead of training)")
    ap.add_argument("--epochs-budget", type=int, default=None, help="epochs for every back-end that trains in epochs")
    ap.add_argument("--int8-json", default=None, help="benchmarks/torch_int8.py --json output to print beside")
    ap.add_argument("--datasets", default="seeds,pendigits,mnist-10k")
    ap.add_argument("--model", default=None, help="zoo model (default: the dataset's thesis topology)")
    ap.add_argument("--bits", default="8,4,2,1")
    ap.add_argument("--scheme", default="thesis", choices=["thesis", "ours"], help="ours = binary at 1 bit, symmetric otherwise")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed+seeds-1 (to extend a sweep)")
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--epochs", type=int, default=None, help="float training epochs (default per dataset)")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "cache"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write all runs to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = {}
    for item in args.param:
        k, _, v = item.partition("=")
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    thesis = json.loads(THESIS_JSON.read_text())["tables"] if THESIS_JSON.is_file() else {}
    method_names = list(methods.METHODS) if args.method == "all" else args.method.split(",")
    bits_list = [int(b) for b in args.bits.split(",")]
    runs = []
    for ds in args.datasets.split(","):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            data = load_data(ds, args.data_dir, seed, None)
            if args.checkpoint:
                model, _ = load_checkpoint(args.checkpoint)
            else:
                model, info = cached_float(data, ds, args.model, seed, Path(args.cache), args.epochs)
            facc = accuracy(model, data.x_test, data.y_test)
            for method in method_names:
                fields = {f.name for f in dataclasses.fields(methods.get_method(method).Params)}
                budget = {k: args.epochs_budget for k in ("epochs", "budget_epochs") if k in fields and args.epochs_budget}
                mparams = {**budget, **params}
                for bits in bits_list:
                    scheme = "thesis" if args.scheme == "thesis" else None
                    spec = QuantSpec(bits=bits, scheme=scheme, per_channel=args.per_channel, seed=seed,
                                     params=mparams, progress=False)
                    t0 = time.time()
                    res = methods.quantize(method, model, data, spec)
                    sec = time.time() - t0
                    qacc = accuracy(res.model, data.x_test, data.y_test)
                    grid = next((r["on_grid_fraction"] for r in res.history if "on_grid_fraction" in r), None)
                    runs.append({"dataset": ds, "seed": seed, "method": method, "bits": bits, "scheme": spec.codes.scheme,
                                 "float": facc, "acc": qacc, "seconds": sec, "on_grid": grid})
                    print(f"  {ds} seed {seed} {method} {spec.codes.describe()}: float {facc:.2f}%  quantized {qacc:.2f}%  ({sec:.1f} s)",
                          file=sys.stderr, flush=True)
                    if args.json:  # after every run, so a long sweep cut short keeps what it measured
                        Path(args.json).write_text(json.dumps(runs, indent=1))
    print(f"\nTest accuracy (%), mean ± std over {args.seeds} seed(s); scheme {args.scheme}"
          f"{', per-channel' if args.per_channel else ''}; params {params or 'defaults'}")
    head = "| dataset | bits | method | float (ours) | ours | thesis same method | thesis best (method) | on grid | s/run |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for ds in args.datasets.split(","):
        tab = thesis.get(THESIS_DATASET.get(ds, ""), {})
        for method in method_names:
            for bits in bits_list:
                rs = [r for r in runs if r["dataset"] == ds and r["method"] == method and r["bits"] == bits]
                if not rs:
                    continue
                same = tab.get(THESIS_NAME.get(method, ""), {}).get(str(bits)) if args.scheme == "thesis" else None
                cells = [(m, row[str(bits)]) for m, row in tab.items() if isinstance(row, dict) and str(bits) in row] \
                    if args.scheme == "thesis" else []
                best = max(cells, key=lambda c: c[1][0]) if cells else None
                print(f"| {ds} | {rs[0]['scheme']} {bits} | {method} | {fmt([r['float'] for r in rs])} | {fmt([r['acc'] for r in rs])} | "
                      f"{f'{same[0]:.2f} ± {same[1]:.2f}' if same else '-'} | "
                      f"{f'{best[1][0]:.2f} ± {best[1][1]:.2f} ({best[0]})' if best else '-'} | "
                      f"{on_grid(rs)} | {statistics.mean(r['seconds'] for r in rs):.1f} |")
    if args.int8_json:
        print_int8(json.loads(Path(args.int8_json).read_text()), args.datasets.split(","))


if __name__ == "__main__":
    main()
