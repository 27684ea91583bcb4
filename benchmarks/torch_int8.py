"""PyTorch's own int8 quantization as baselines beside qexport's methods (the thesis's DQ, SQ, QAT rows).

For each dataset/model and seed, the float model and three int8 versions of it are scored on the
same test split (CPU, quantized engine "x86" = fbgemm + oneDNN kernels):

  dynamic  int8 weights (per tensor) of every nn.Linear, activations quantized on the fly with a
           scale from each input batch (evaluation batches are 1,024 rows, `qadmm.train.accuracy`)
           (`torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`, eager mode).
           Conv layers are untouched: on cnn-small/resnet20 only the Linear head becomes int8, and
           the table says so ("[1/3 int8]"); a model without Linear layers shows "n/a".
  static   post-training int8 weights (per channel) and activations (per tensor, HistogramObserver with
           the x86 default reduce_range=True, i.e. uint8 codes 0..127),
           FX graph mode: `prepare_fx(model, get_default_qconfig_mapping("x86"), example)`, a pass
           over `--calib-samples` training images (drawn by the seed), `convert_fx`. BatchNorm is
           folded into the convs, ReLUs fused, ResNet's residual adds become quantized add(+ReLU); the
           zoo's Normalize (x - mean) / std stays float in front of the first quantize.
  qat      int8 quantization-aware fine-tuning from the same float model: `prepare_qat_fx(model,
           get_default_qat_qconfig_mapping("x86"), example)` (fake-quant weights and activations,
           Conv+BN fused; BN statistics frozen at the float model's unless `--qat-update-bn`), then
           `--qat-epochs` of Adam (`--qat-lr`, cosine to 0, batch `--qat-batch-size`, no augmentation)
           on `--qat-samples` training examples drawn by the seed (default all), then `convert_fx`.

Why these APIs. torch 2.13 still ships eager mode (`torch.ao.quantization.quantize_dynamic`,
`prepare`/`convert`) and FX graph mode (`torch.ao.quantization.quantize_fx`), but every entry point
is decorated `@typing_extensions.deprecated` ("torch.ao.quantization is deprecated and will be
removed in 2.10 ... migrate to torchao"; see `torch/ao/quantization/utils.py: DEPRECATION_WARNING`).
The successors are not available here: PT2E (`torch.ao.quantization.quantize_pt2e`,
`torch.ao.quantization.quantizer.X86InductorQuantizer`) has been removed from torch 2.13 (moved to
torchao), and torchao is not installed. FX graph mode is used for static and QAT because it traces
the zoo models unchanged (eager mode would need QuantStub/DeQuantStub and FloatFunctional for the
residual adds, i.e. a rewritten ResNet). Every warning raised while quantizing is recorded (once per
distinct text) in the printed summary and the JSON.

Float models: the shipped checkpoints where there is one (digits/mlp-digits, fashion-mnist/cnn-small,
fashion-mnist/resnet20; their data split is the checkpoint's, so the seed only changes calibration
images and QAT batches), else the zoo model trained per seed by `qexport.workflow.float_model` with
the CLI's defaults, exactly as benchmarks/thesis_table.py does (`--cache DIR` shares its cache).

    OMP_NUM_THREADS=1 python benchmarks/torch_int8.py --data-dir ../shared/data \\
        --datasets digits,seeds,pendigits --seeds 3 --qat-epochs 3 --json /tmp/torch_int8.json

`--jsonl FILE` also writes every result as a `qexport sweep` record (methods `torch-dynamic`,
`torch-static`, `torch-qat`, scheme `int8`, 8 bits, the model labelled as the sweeps label it), so
that `qexport report ours.jsonl torch-int8.jsonl` puts them in the same tables as qexport's methods
and beside the thesis's DQ/SQ/QAT rows.
    OMP_NUM_THREADS=1 python benchmarks/torch_int8.py --datasets fashion-mnist:cnn-small,fashion-mnist:resnet20 \\
        --seeds 1 --qat-epochs 1 --qat-samples 10000

`--datasets` takes `name` (the dataset's default model) or `name:model`. The table shows test
accuracy (%) as mean ± std over seeds and the wall seconds of each path (prepare + calibrate or
train + convert; evaluation not included).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qadmm.data import Dataset, load_dataset  # noqa: E402
from qadmm.errors import UserError  # noqa: E402
from qadmm.train import accuracy, seed_everything, train_epoch  # noqa: E402
from qadmm.zoo import default_model  # noqa: E402
from qexport.checkpoint import load_checkpoint  # noqa: E402
from qexport.sweep import checkpoint_label  # noqa: E402
from qexport.workflow import float_model  # noqa: E402

ENGINE = "x86"
PATHS = ("dynamic", "static", "qat")
CHECKPOINTS = {("digits", "mlp-digits"): "models/digits-mlp.safetensors",
               ("fashion-mnist", "cnn-small"): "models/fashion-cnn-small.safetensors",
               ("fashion-mnist", "resnet20"): "models/fashion-resnet20.safetensors"}
API = {"dynamic": "torch.ao.quantization.quantize_dynamic({nn.Linear}, qint8) [eager, deprecated]",
       "static": "torch.ao.quantization.quantize_fx.prepare_fx/convert_fx + get_default_qconfig_mapping('x86') "
                 "[FX, deprecated]",
       "qat": "torch.ao.quantization.quantize_fx.prepare_qat_fx/convert_fx + get_default_qat_qconfig_mapping('x86') "
              "[FX, deprecated]"}


@contextmanager
def recorded_warnings(seen: dict[str, str]) -> Iterator[None]:
    """Collect every warning raised inside, keyed by its text (so each distinct one is kept once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = " ".join(str(w.message).split())
        seen.setdefault(text, w.category.__name__)


def weight_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


def int8_layers(model: nn.Module) -> int:
    """Quantized Linear/Conv modules (plain, fused with ReLU, or dynamic) in a converted model."""
    names = [type(m).__name__ for m in model.modules() if ".quantized" in type(m).__module__]
    return sum(("Linear" in n or "Conv" in n) and "PackedParams" not in n for n in names)


def dynamic_int8(model: nn.Module, data: Dataset, seed: int, a: argparse.Namespace) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def static_int8(model: nn.Module, data: Dataset | None, seed: int, a: argparse.Namespace,
                x: torch.Tensor | None = None) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    x = data.calibration(a.calib_samples, seed) if x is None else x
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(ENGINE), (x[:1],))
    with torch.no_grad():
        for i in range(0, len(x), 256):
            prepared(x[i : i + 256])
    return convert_fx(prepared)


def qat_int8(model: nn.Module, data: Dataset, seed: int, a: argparse.Namespace) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    gen = seed_everything(seed)
    x = torch.as_tensor(data.x_train)
    y = torch.as_tensor(data.y_train)
    if a.qat_samples and a.qat_samples < len(x):
        pick = torch.randperm(len(x), generator=gen)[: a.qat_samples]
        x, y = x[pick], y[pick]
    prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping(ENGINE), (x[:2],))
    if not a.qat_update_bn:  # fold the float model's BatchNorm statistics, as static does (ConvBn* QAT modules)
        prepared.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    opt = torch.optim.Adam(prepared.parameters(), lr=a.qat_lr)
    steps = a.qat_epochs * -(-len(x) // a.qat_batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    prepared.train()
    for _ in range(a.qat_epochs):
        train_epoch(prepared, opt, x, y, a.qat_batch_size, gen, after_step=sched.step)
    return convert_fx(prepared.eval())


QUANTIZERS: dict[str, Callable[..., nn.Module]] = {"dynamic": dynamic_int8, "static": static_int8, "qat": qat_int8}


def get_float(ds: str, model_name: str, seed: int, a: argparse.Namespace) -> tuple[nn.Module, Dataset, str]:
    """(float model in eval mode, its data split, where the model came from)."""
    ckpt = CHECKPOINTS.get((ds, model_name))
    if ckpt:
        model, meta = load_checkpoint(ROOT / ckpt)
        data = load_dataset(ds, a.data_dir, seed=int(meta.get("dataset", {}).get("seed", 0)))
        return model.eval(), data, ckpt
    data = load_dataset(ds, a.data_dir, seed=seed)
    if a.cache:
        from thesis_table import cached_float  # same recipe and cache keys as the thesis table

        model, _ = cached_float(data, ds, model_name, seed, Path(a.cache), None)
    else:
        model, _, _ = float_model(data, model_name, None, seed, None, 3e-3, 32, 30, progress=False)
    return model.eval(), data, f"trained (seed {seed})"


def run_one(ds: str, model_name: str, seed: int, a: argparse.Namespace, seen: dict[str, str]) -> dict:
    model, data, source = get_float(ds, model_name, seed, a)
    ckpt = CHECKPOINTS.get((ds, model_name))
    row = {"dataset": ds, "model": model_name, "label": checkpoint_label(ckpt) if ckpt else model_name,  # as a sweep labels it
           "seed": seed, "source": source, "n_test": len(data.y_test), "weight_layers": weight_layers(model),
           "float": accuracy(model, data.x_test, data.y_test), "float_bytes": 4 * sum(v.numel() for v in model.state_dict().values()
                                                                                      if v.is_floating_point()),
           "seconds": {}, "eval_seconds": {}, "int8_layers": {}, "model_bytes": {}}  # + one test accuracy (or None) per path
    for path in a.paths:
        t0 = time.time()
        with recorded_warnings(seen):
            qmodel = QUANTIZERS[path](model, data, seed, a)
        seconds = time.time() - t0
        n8 = int8_layers(qmodel)
        t1 = time.time()
        acc = accuracy(qmodel, data.x_test, data.y_test) if n8 else None
        row[path] = acc
        row["model_bytes"][path] = int8_model_bytes(model, path)
        row["seconds"][path], row["eval_seconds"][path], row["int8_layers"][path] = seconds, time.time() - t1, n8
        print(f"  {ds}/{model_name} seed {seed} {path}: float {row['float']:.2f}%  int8 "
              f"{'n/a' if acc is None else f'{acc:.2f}%'} ({n8}/{row['weight_layers']} layers int8, {seconds:.1f} s)",
              file=sys.stderr, flush=True)
    return row


def int8_model_bytes(model: nn.Module, path: str) -> int:
    """Bytes of the int8 model: int8 weights of the layers the path quantizes (+ an fp32 scale per
    output channel, per tensor for dynamic), every other parameter and buffer fp32."""
    kinds = (nn.Linear,) if path == "dynamic" else (nn.Linear, nn.Conv2d)
    layers = {n for n, m in model.named_modules() if isinstance(m, kinds)}
    total = 0
    for name, v in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers and leaf == "weight":
            total += v.numel() + 4 * (1 if path == "dynamic" else v.shape[0])
        elif v.is_floating_point():
            total += 4 * v.numel()
    return total


def sweep_records(runs: list[dict], a: argparse.Namespace) -> list[dict]:
    """The runs as `qexport sweep` records (schema qexport.sweep/1), one per run and path."""
    import hashlib
    from datetime import datetime, timezone

    from qexport.fileio import versions

    out, made_by = [], versions()
    for r in runs:
        for path in a.paths:
            if r.get(path) is None:
                continue
            params = {"dynamic": {}, "static": {"calib_samples": a.calib_samples},
                      "qat": {"epochs": a.qat_epochs, "lr": a.qat_lr, "batch_size": a.qat_batch_size,
                              "samples": a.qat_samples, "update_bn": a.qat_update_bn}}[path]
            cell = {"dataset": r["dataset"], "model": r["label"], "method": f"torch-{path}", "params": {},
                    "bits": 8, "scheme": "int8", "per_channel": path != "dynamic", "seed": r["seed"], "export": None}
            out.append({"schema": "qexport.sweep/1", "key": hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:16],
                        "cell": cell, "status": "ok", "error": None, "scheme": "int8", "acc": r[path], "float_acc": r["float"],
                        "method_params": {"api": API[path], "engine": ENGINE, **params}, "verify": None,
                        "sizes": {"model_bytes": r["model_bytes"][path], "float_bytes": r["float_bytes"]},
                        "seconds": {"quantize": r["seconds"][path], "total": r["seconds"][path]},
                        "float_model": r["source"], "versions": made_by, "worker": "benchmarks/torch_int8.py",
                        "int8_layers": f"{r['int8_layers'][path]}/{r['weight_layers']}",
                        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    return out


def fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def cell(rows: list[dict], path: str) -> str:
    if path not in rows[0]:
        return "not run"
    if rows[0][path] is None:
        return "n/a (no int8 layer)"
    k, n = rows[0]["int8_layers"][path], rows[0]["weight_layers"]
    return fmt([r[path] for r in rows]) + ("" if k == n else f" [{k}/{n} int8]")


def print_table(runs: list[dict], a: argparse.Namespace) -> None:
    print(f"\nTest accuracy (%) of PyTorch int8 paths, mean ± std over seeds; engine {ENGINE}, torch {torch.__version__}; "
          f"calib {a.calib_samples}, QAT {a.qat_epochs} epoch(s) on {a.qat_samples or 'all'} samples, "
          f"Adam lr {a.qat_lr}, BN {'updated' if a.qat_update_bn else 'frozen'}")
    print("| dataset | model | float model | seeds | float | dynamic int8 | static int8 | QAT int8 "
          "| s dynamic | s static | s QAT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["dataset"], r["model"]) for r in runs):
        rows = [r for r in runs if (r["dataset"], r["model"]) == key]
        secs = [f"{statistics.mean(r['seconds'][p] for r in rows):.2f}" if p in rows[0] else "-" for p in PATHS]
        cells = [*key, rows[0]["source"].split(" (")[0], str(len(rows)), fmt([r["float"] for r in rows]),
                 *(cell(rows, p) for p in PATHS), *secs]
        print("| " + " | ".join(cells) + " |")
    print("[k/n int8]: only k of the model's n Linear/Conv layers are int8 (dynamic quantization leaves convs float).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="digits,seeds,pendigits,mnist,fashion-mnist:cnn-small,fashion-mnist:resnet20",
                    help="comma-separated name or name:model")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--paths", default=",".join(PATHS), help="subset of dynamic,static,qat")
    ap.add_argument("--calib-samples", type=int, default=1024, help="training images for static calibration")
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--qat-samples", type=int, default=0, help="training examples for QAT (0: all)")
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--qat-batch-size", type=int, default=64)
    ap.add_argument("--qat-update-bn", action="store_true", help="let QAT update BatchNorm statistics (default: frozen)")
    ap.add_argument("--cache", default=None, help="cache trained float models here (benchmarks/thesis_table.py's keys)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write every run to this JSON file")
    ap.add_argument("--jsonl", default=None, help="also write every result as a qexport sweep record to this file, "
                                                   "for `qexport report ours.jsonl THIS`")
    a = ap.parse_args()
    a.paths = [p for p in a.paths.split(",") if p]
    if bad := [p for p in a.paths if p not in PATHS]:
        ap.error(f"unknown path(s) {bad}; use {','.join(PATHS)}")
    torch.set_num_threads(a.threads)
    torch.backends.quantized.engine = ENGINE
    seen: dict[str, str] = {}
    with recorded_warnings(seen):  # once, so that no path's seconds include the lazy imports of the first call
        static_int8(nn.Sequential(nn.Linear(2, 2)), None, 0, a, x=torch.zeros(1, 2))
    runs, skipped = [], []
    for spec in a.datasets.split(","):
        ds, _, model_name = spec.partition(":")
        for seed in range(a.seeds):
            try:
                model_name = model_name or default_model(ds, load_dataset(ds, a.data_dir, seed=0).input_shape)
                runs.append(run_one(ds, model_name, seed, a, seen))
            except UserError as e:
                print(f"skipping {spec}: {e}", file=sys.stderr)
                skipped.append({"dataset": spec, "reason": str(e)})
                break
    print_table(runs, a)
    for s in skipped:
        print(f"skipped {s['dataset']}: {s['reason']}")
    print("\nAPIs: " + "; ".join(f"{p}: {API[p]}" for p in a.paths))
    print("Warnings raised while quantizing (each distinct text once):")
    for text, cat in seen.items():
        print(f"  {cat}: {text}")
    if a.json:
        Path(a.json).write_text(json.dumps({"torch": torch.__version__, "engine": ENGINE, "args": vars(a), "apis": API,
                                            "warnings": [{"category": c, "text": t} for t, c in seen.items()],
                                            "skipped": skipped, "runs": runs}, indent=1))
    if a.jsonl:
        Path(a.jsonl).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in sweep_records(runs, a)))


if __name__ == "__main__":
    main()
