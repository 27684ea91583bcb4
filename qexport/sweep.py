"""Experiment sweeps: a TOML grid of datasets × models × methods × bits × code sets × seeds, run
cell by cell, one JSON line per finished cell (schema `qexport.sweep/1`, read by qexport.report).

    datasets = ["digits"]          # the minimal config
    models = ["mlp-digits"]
    methods = ["ptq"]
    bits = [2, 4]
    seeds = [0]

Each float model (dataset, model, seed) is trained once, first, and cached beside the results;
then every cell quantizes it, optionally exports and verifies the ONNX file, and appends its line.
Re-running skips cells already in the file (so an interrupted sweep resumes); a failing cell records
its one-line error and the sweep goes on. Cells run in worker processes on this machine, or as Ray
tasks (`backend="ray"`) on a cluster; the driver alone writes the file, a whole line at a time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import socket
import tempfile
import time
import tomllib
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from qadmm.errors import BadData, BadValue, UserError
from qexport.fileio import PathLike
from qexport.provenance import float_card, stamp

SCHEMA = "qexport.sweep/1"
FORMS = ("weights", "qdq", "qoperator")  # the names of qexport.onnx.forms.FORMS (imported there: this module stays light)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelSpec:
    """A model of the grid: a zoo name or `file.py:factory` (trained here on each dataset and seed),
    a qexport checkpoint, or a factory with your trained weights (`checkpoint`)."""

    name: str | None = None  # paths resolved against the config's folder
    checkpoint: str | None = None
    normalize: str | None = None  # for a factory: none | fit | MEAN,STD (as `qexport quantize --normalize`)
    given: str = ""  # as written in the config: the name in results and reports

    @property
    def label(self) -> str:
        return self.given or self.name or str(self.checkpoint)

    @property
    def trained_here(self) -> bool:
        return self.checkpoint is None


@dataclass(frozen=True)
class Cell:
    """One run of the grid. Its `key` (a hash of every field) names it in the results file."""

    dataset: str
    model: str  # ModelSpec.label
    method: str
    params: dict
    bits: int
    scheme: str | None
    per_channel: bool
    seed: int
    export: str | None
    spec: dict = field(default_factory=dict)  # other QuantSpec fields of the request (the config's [spec] axes)

    @property
    def key(self) -> str:
        # (a cell with no [spec] axes keeps the key it had before they existed)
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]

    def record(self) -> dict:
        """The cell as its results line names it (no `spec` where the grid has no [spec] axes)."""
        d = dataclasses.asdict(self)
        if not d["spec"]:
            del d["spec"]
        return d

    def request(self, device: str = "cpu"):
        """The whole request of this cell, a `qexport.config.Config`: any QuantSpec field is a grid axis."""
        from qexport.config import config

        return config(self.method, bits=self.bits, scheme=self.scheme, per_channel=self.per_channel, params=self.params,
                      seed=self.seed, device=device, **self.spec)


@dataclass
class SweepConfig:
    datasets: list[str]
    models: list[ModelSpec]
    methods: list[tuple[str, dict]]  # (back-end, its hyperparameters)
    bits: list[int]
    seeds: list[int]
    schemes: list[str | None] = field(default_factory=lambda: [None])  # None: qexport's default for the bits
    per_channel: list[bool] = field(default_factory=lambda: [False])
    export: str | None = None  # an ONNX form to export and verify every cell in; None: no export
    budget: int | None = None  # epochs for every back-end that trains in epochs (the same budget for all)
    data_dir: str | None = None
    float_epochs: int | None = None  # float training of models trained here (default per dataset)
    float_lr: float = 3e-3
    float_batch_size: int = 32
    float_patience: int = 30
    verify_samples: int | None = None  # test samples for verify (default: the whole test split)
    device: str = "cpu"  # where the back-ends that train run (cpu, cuda, cuda:1 ...), as `quantize --device`
    # any other QuantSpec field as an axis: {"keep_first": [False, True], "layer_bits": [{}, {"body.0": 8}], ...}
    spec: dict[str, list] = field(default_factory=dict)
    source: str = ""  # where the config came from, recorded in every line
    base: str | None = None  # the config's folder: dataset files are named relative to it

    def data_path(self, dataset: str) -> str:
        """Where dataset `dataset` (a name, or a file as the config names it) is read from."""
        from qadmm.data import NAMES as DATASETS

        if dataset in DATASETS or self.base is None or Path(dataset).is_absolute():
            return dataset
        return str(Path(self.base) / dataset)

    def models_for(self, dataset: str) -> list[ModelSpec]:
        """The models run on `dataset`: "default" is the dataset's own zoo model (the thesis's topology)."""
        from qadmm.data import NAMES as DATASETS
        from qadmm.zoo import default_model

        return [ModelSpec(default_model(dataset, ()), None, None, default_model(dataset, ()))
                if m.given == "default" and dataset in DATASETS else m for m in self.models]

    def model(self, dataset: str, label: str) -> ModelSpec:
        return next(m for m in self.models_for(dataset) if m.label == label)

    def cells(self) -> list[Cell]:
        """The grid's cells in a fixed order (dataset, model, seed outermost: a float model's cells run together)."""
        from qadmm import methods as registry

        out = []
        for ds in self.datasets:
            for m in self.models_for(ds):
                for seed in self.seeds:
                    for name, params in self.methods:
                        fields = {f.name for f in dataclasses.fields(registry.get_method(name).Params)}
                        budget = {k: self.budget for k in ("epochs", "budget_epochs") if k in fields and self.budget}
                        for bits in self.bits:
                            for scheme in self.schemes:
                                for pc in self.per_channel:
                                    for spec in self.spec_values():
                                        out.append(Cell(ds, m.label, name, {**budget, **params}, bits, scheme, pc, seed,
                                                        self.export, spec))
        return out

    def spec_values(self) -> list[dict]:
        """Every combination of the [spec] axes (one empty one without)."""
        names = sorted(self.spec)
        return [dict(zip(names, combo)) for combo in itertools.product(*(self.spec[n] for n in names))]

    def floats(self) -> list[tuple[str, ModelSpec, int]]:
        """The (dataset, model, seed) float models to train before the cells (checkpoints need none)."""
        return [(ds, m, s) for ds in self.datasets for m in self.models_for(ds) if m.trained_here for s in self.seeds]


# ---------------------------------------------------------------- the config file

KEYS = {f.name for f in dataclasses.fields(SweepConfig)} - {"source", "base"}
# the QuantSpec fields a [spec] table may vary (the others have keys of their own, or are the run's: progress, device)
SPEC_AXES = ("layer_bits", "exclude", "keep_first", "keep_last", "calib_samples", "bn_reestimate", "bias_correction")
REQUIRED = ("datasets", "models", "methods", "bits", "seeds")


def _list(raw: dict, key: str, where: str, kind: type | tuple, default: Any = None) -> list:
    v = raw.get(key, default)
    if not isinstance(v, list) or not v:
        raise BadValue(f"{where}: '{key}' must be a non-empty list, e.g. {key} = {json.dumps(default or ['...'])}")
    for item in v:
        if not isinstance(item, kind) or isinstance(item, bool) and kind is int:
            raise BadValue(f"{where}: '{key}' has {item!r}; expected {getattr(kind, '__name__', 'a string or table')} values")
    return v


def checkpoint_label(path: str | Path) -> str:
    """How results name a model given as a checkpoint file: models/net.safetensors is "net"."""
    return Path(path).name.split(".")[0]


def parse_config(raw: dict, where: str = "config", base: Path | None = None) -> SweepConfig:
    """A SweepConfig from a parsed TOML table, every field checked; relative paths are taken from
    `base` (the config file's folder)."""
    from qadmm import methods as registry
    from qadmm.data import NAMES as DATASETS

    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise BadValue(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(KEYS))}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise BadValue(f"{where}: missing {', '.join(missing)} (a minimal config: datasets = [\"digits\"], "
                       "models = [\"mlp-digits\"], methods = [\"ptq\"], bits = [2, 4], seeds = [0])")

    def path(p: str | None) -> str | None:
        return None if p is None or base is None or Path(p).is_absolute() else str(base / p)

    datasets = []
    for d in _list(raw, "datasets", where, str):
        if d in DATASETS:
            datasets.append(d)
        elif Path(path(d) or d).is_file():
            datasets.append(d)  # as written: results name it so, wherever the folder moves
        else:
            raise BadValue(f"{where}: dataset {d!r} is neither one of {', '.join(DATASETS)} nor a file")
    models = []
    for m in _list(raw, "models", where, (str, dict)):
        if isinstance(m, dict):
            extra = set(m) - {"name", "checkpoint", "normalize"}
            if extra or not m.get("name") and not m.get("checkpoint"):
                raise BadValue(f"{where}: a model table takes name, checkpoint and normalize, e.g. "
                               "{name = \"net.py:Net\", checkpoint = \"net.pt\"}" + (f"; not {sorted(extra)[0]!r}" if extra else ""))
            given = f"{m.get('name')}@{Path(m['checkpoint']).name}" if m.get("name") and m.get("checkpoint") else \
                m.get("name") or m["checkpoint"]
            spec = ModelSpec(m.get("name") and _factory_path(m["name"], base), path(m.get("checkpoint")) or m.get("checkpoint"),
                             m.get("normalize"), given)
        elif m.endswith(CHECKPOINT_SUFFIXES):
            spec = ModelSpec(None, path(m) or m, None, checkpoint_label(m))
        elif m == "default":
            spec = ModelSpec(None, None, None, "default")
        else:
            spec = ModelSpec(_factory_path(m, base), None, None, m)
        if spec.checkpoint and not Path(spec.checkpoint).is_file():
            raise BadValue(f"{where}: checkpoint {spec.checkpoint} not found")
        file = (spec.name or "").rpartition(":")[0]
        if file.endswith(".py") and not Path(file).is_file():
            raise BadValue(f"{where}: model file {file} not found (a factory is file.py:function, relative to the config)")
        if spec.normalize not in (None, "none", "fit"):
            try:
                [float(v) for v in str(spec.normalize).split(",")][1]
            except (ValueError, IndexError):
                raise BadValue(f"{where}: normalize = {spec.normalize!r}: use none, fit or \"MEAN,STD\"") from None
        models.append(spec)
    labels = [m.label for m in models]
    if len(set(labels)) < len(labels):
        twice = next(x for x in labels if labels.count(x) > 1)
        raise BadValue(f"{where}: two models are named {twice!r} in the results: rename one of the files")
    entries = []
    for m in _list(raw, "methods", where, (str, dict)):
        name, params = (m, {}) if isinstance(m, str) else (m.get("name"), m.get("params", {}))
        if isinstance(m, dict) and (set(m) - {"name", "params"} or not isinstance(params, dict)):
            raise BadValue(f"{where}: a method table is {{name = \"admm-q\", params = {{rho = 0.01}}}}, got {m!r}")
        if name not in registry.METHODS:
            raise BadValue(f"{where}: unknown method {name!r}; the back-ends are {', '.join(registry.METHODS)}")
        entries.append((name, dict(params)))
    bits = _list(raw, "bits", where, int)
    seeds = _list(raw, "seeds", where, int)
    schemes = _list(raw, "schemes", where, str, ["default"])
    schemes = [None if s == "default" else s for s in schemes]
    per_channel = _list(raw, "per_channel", where, bool, [False])
    export = raw.get("export", False)
    if export is not False and export not in FORMS:
        raise BadValue(f"{where}: export = {export!r}: use false or one of {', '.join(FORMS)}")
    spec_axes = raw.get("spec", {})
    if not isinstance(spec_axes, dict):
        raise BadValue(f"{where}: [spec] is a table of QuantSpec fields, each a list of values, e.g. keep_first = [false, true]")
    for k, v in spec_axes.items():
        if k not in SPEC_AXES:
            raise BadValue(f"{where}: [spec] {k!r} is not a field a cell varies; use one of {', '.join(SPEC_AXES)} "
                           "(bits, schemes, per_channel, seeds and methods have their own keys)")
        if not isinstance(v, list) or not v:
            raise BadValue(f"{where}: [spec] {k} must be a non-empty list of values, e.g. {k} = [...]")
    cfg = SweepConfig(datasets, models, entries, bits, seeds, schemes, per_channel, export or None,
                      spec={k: list(v) for k, v in spec_axes.items()},
                      source=where, data_dir=path(raw.get("data_dir")) or raw.get("data_dir"),
                      base=None if base is None else str(base))
    for key in ("budget", "float_epochs", "float_batch_size", "float_patience", "verify_samples"):
        if key in raw:
            if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
                raise BadValue(f"{where}: '{key}' must be a positive integer, got {raw[key]!r}")
            setattr(cfg, key, raw[key])
    if "device" in raw:
        if not isinstance(raw["device"], str) or not raw["device"]:
            raise BadValue(f"{where}: 'device' must be a string such as \"cpu\" or \"cuda\", got {raw['device']!r}")
        cfg.device = raw["device"]
    if "float_lr" in raw:
        if not isinstance(raw["float_lr"], (int, float)) or not 0 < raw["float_lr"] < math.inf:
            raise BadValue(f"{where}: 'float_lr' must be a positive number, got {raw['float_lr']!r}")
        cfg.float_lr = float(raw["float_lr"])
    for s in seeds:
        if not 0 <= s < 2**32:
            raise BadValue(f"{where}: seed {s} must be in 0..2^32-1")
    for name, params in entries:  # every request as `qexport quantize` checks it, before any work
        for b in bits:
            for sc in schemes:
                for extra in cfg.spec_values():
                    try:
                        Cell("", "", name, params, b, sc, False, 0, None, extra).request(cfg.device)
                    except (UserError, TypeError, ValueError) as e:
                        msg = str(e).replace("use --device cpu", 'use device = "cpu"')  # the config's words, not the CLI's
                        raise BadValue(f"{where}: {name} at {b} bits{' with ' + json.dumps(extra) if extra else ''}: {msg}") from None
    return cfg


def _factory_path(name: str, base: Path | None) -> str:
    """`file.py:factory` relative to the config's folder; zoo names and module:factory as given."""
    file, sep, fn = name.rpartition(":")
    if sep and file.endswith(".py") and base is not None and not Path(file).is_absolute():
        return f"{base / file}:{fn}"
    return name


def load_config(path: PathLike) -> SweepConfig:
    """The sweep config in TOML file `path`, checked (one-line errors naming the key)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadValue(f"config {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadData(f"config {path} is not valid TOML: {e}") from None
    return parse_config(raw, str(path), path.resolve().parent)


# ---------------------------------------------------------------- the results file


def read_results(path: PathLike) -> list[dict]:
    """The lines already in a results file (missing file: none). A torn last line (the machine
    stopped mid-write) is cut off, so the next line appended starts clean."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        raw = raw[:cut]
    out = []
    for i, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise BadData(f"{path}:{i} is not a JSON line: this is not a sweep results file (use another -o)") from None
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
            raise BadData(f"{path}:{i} is not a {SCHEMA} line: this is not a sweep results file (use another -o)")
        out.append(rec)
    return out


def append_line(path: Path, record: dict) -> None:
    """One whole line, flushed to disk: a finished cell survives Ctrl-C or a crash right after."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- one cell, in a worker


@dataclass(frozen=True)
class Job:
    """What a worker needs besides the cell: the shared settings and the float model. A float model
    trained by the sweep travels as its checkpoint's bytes (a Ray node may not see the driver's disk)."""

    data: str  # the dataset's name or file (resolved)
    data_dir: str | None
    float_blob: bytes | None  # the float checkpoint trained by the sweep ...
    model: ModelSpec  # ... or the model itself (checkpoints, factory + weights: paths every worker sees)
    verify_samples: int | None
    source: str
    device: str = "cpu"


def float_key(cfg: SweepConfig, ds: str, m: ModelSpec, seed: int) -> str:
    recipe = [ds, m.name, m.normalize, seed, cfg.float_epochs, cfg.float_lr, cfg.float_batch_size, cfg.float_patience,
              cfg.data_dir]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def train_float(cfg_fields: dict, ds: str, m: ModelSpec, seed: int) -> bytes:  # ds: resolved (SweepConfig.data_path)
    """Train one float model of the grid; its qexport checkpoint's bytes."""
    from qexport.checkpoint import save_checkpoint
    from qexport.workflow import float_model, load_data, preprocessing

    data = load_data(ds, cfg_fields["data_dir"], seed, None)
    model, name, info = float_model(data, m.name, None, seed, cfg_fields["float_epochs"], cfg_fields["float_lr"],
                                    cfg_fields["float_batch_size"], cfg_fields["float_patience"], False, m.normalize)
    arch = {"model": name, "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    with tempfile.TemporaryDirectory(prefix="qexport-sweep-") as tmp:
        path = Path(tmp) / "float.safetensors"
        save_checkpoint(path, model, float_card(arch, preprocessing(data), data.describe(), info, "qexport sweep"))
        return path.read_bytes()


def run_cell(cell: Cell, job: Job) -> dict:
    """Quantize (and export + verify) one cell; its results line. Never raises: a failure is the
    line's `error` (one line), so one bad cell cannot stop a sweep."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"schema": SCHEMA, "key": cell.key, "cell": cell.record(), "config": job.source}
    try:
        rec.update(_quantize_cell(cell, job))
        rec["status"], rec["error"] = "ok", None
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the sweep goes on
        msg = str(e).splitlines()[0] if str(e) else ""
        rec["status"], rec["error"] = "error", f"{type(e).__name__}: {msg}" if not isinstance(e, UserError) else msg
    rec["seconds"] = {**rec.get("seconds", {}), "total": round(time.perf_counter() - t0, 3)}
    rec = stamp(rec, "qexport sweep")
    rec["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    rec["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return rec


def _quantize_cell(cell: Cell, job: Job) -> dict:
    from qexport import api
    from qexport.checkpoint import load_checkpoint
    from qexport.provenance import Provenance, is_user_model
    from qexport.workflow import float_model, load_data

    data = load_data(job.data, job.data_dir, cell.seed, None)
    with tempfile.TemporaryDirectory(prefix="qexport-sweep-") as tmp:
        m = job.model
        if job.float_blob is not None:
            (Path(tmp) / "float.safetensors").write_bytes(job.float_blob)
            model, meta = load_checkpoint(Path(tmp) / "float.safetensors")
            name, source = meta["architecture"]["model"], {"trained_by": "qexport sweep", **meta.get("training", {})}
        else:
            model, name, source = float_model(data, m.name, m.checkpoint, cell.seed, None, 3e-3, 32, 30, False)
        user = is_user_model(m.name) and bool(m.checkpoint)
        t0 = time.perf_counter()
        art = api.quantize(model, data, cell.request(job.device), normalize=m.normalize if user else None,
                           provenance=Provenance(name, source, "qexport sweep"))
        seconds = {"quantize": round(time.perf_counter() - t0, 3)}
        out: dict[str, Any] = {"scheme": art.meta["spec"]["scheme"], "float_acc": art.meta["accuracy"]["float_test"],
                               "acc": art.meta["accuracy"]["quantized_test"], "method_params": art.meta["method"]["params"],
                               "sizes": {**art.sizes(), "artifact_bytes": None, "onnx_bytes": None}, "verify": None,
                               "codes_hash": codes_hash(art), "data": art.meta["dataset"], "float_model": source}
        path = Path(tmp) / "cell.qx.safetensors"
        out["artifact_hash"] = art.save(path)
        out["sizes"]["artifact_bytes"] = path.stat().st_size
        if cell.export:
            onnx_path = Path(tmp) / "cell.onnx"
            t1 = time.perf_counter()
            api.to_onnx(art, onnx_path, form=cell.export, calib_data=data)
            rep = api.verify(onnx_path, art, data, max_samples=job.verify_samples)
            seconds["export_verify"] = round(time.perf_counter() - t1, 3)
            out["sizes"]["onnx_bytes"] = onnx_path.stat().st_size
            runs = list(rep["runs"].values())
            out["verify"] = {"form": cell.export, "passed": bool(rep["passed"]), "samples": rep["samples"],
                             "agreement": min(r["top1_agreement"] for r in runs), "onnx_acc": runs[0]["accuracy"],
                             "max_abs": max(r["max_abs"] for r in runs)}
    out["seconds"] = seconds
    return out


def codes_hash(art) -> str:
    """A hash of the result itself (every layer's codes and scales), equal across machines and
    backends for the same cell; the artifact's own hash also covers its timings."""
    h = hashlib.sha256()
    for name in sorted(art.layers):
        lc = art.layers[name]
        h.update(name.encode())
        h.update(lc.q.contiguous().numpy().tobytes())
        h.update(lc.alpha.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the driver


class WorkerDied(Exception):
    """A worker process ended without returning (killed, out of memory, a crash in native code)."""


@dataclass
class SweepSummary:
    cells: int  # in the grid
    skipped: int  # already in the results file
    ok: int
    failed: int
    seconds: float
    interrupted: bool = False


def worker_threads(workers: int) -> int:
    """Torch threads per worker so `workers` processes do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // max(workers, 1))


def _init_worker(threads: int) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops the workers, no tracebacks from each
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


class LocalPool:
    """Worker processes on this machine (spawned: each imports torch afresh, nothing inherited)."""

    def __init__(self, workers: int):
        import multiprocessing

        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(worker_threads(workers),))

    def submit(self, fn: Callable, *args) -> Future:
        return self.pool.submit(fn, *args)

    def completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            # results first: when a worker dies, the cells that finished with it are written before
            # the sweep stops on the failed ones
            yield from sorted(done, key=lambda f: f.exception() is not None)

    def result(self, fut: Future) -> Any:
        return fut.result()

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for p in list(getattr(self.pool, "_processes", {}).values()):  # stop running cells now, not after them
                p.terminate()
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


class RayPool:
    """Ray tasks: the same functions on a Ray cluster (`address`: "auto", "ray://head:10001", or
    None for a local instance). Every node needs qexport installed and the data at `data_dir`."""

    def __init__(self, workers: int | None, address: str | None):
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray: pip install 'qexport[ray]' (or pip install ray)") from None
        self.ray, self.started = ray, not ray.is_initialized()  # a caller's own Ray session is left running
        if self.started:
            kw = {"num_cpus": workers} if address is None and workers else {}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR", **kw)
        self.threads = 1 if address else worker_threads(workers or os.cpu_count() or 1)
        self.remote: dict[Callable, Any] = {}

    def submit(self, fn: Callable, *args) -> Any:
        if fn not in self.remote:
            self.remote[fn] = self.ray.remote(num_cpus=1)(_in_ray).options(name=fn.__name__)
        return self.remote[fn].remote(self.threads, fn, *args)

    def completed(self, refs: Iterable[Any]) -> Iterator[Any]:
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield from done

    def result(self, ref: Any) -> Any:
        return self.ray.get(ref)

    def close(self, cancel: bool = False) -> None:
        if self.started:  # ends this driver's tasks too (Ray fails the tasks whose owner is gone)
            self.ray.shutdown()


def _in_ray(threads: int, fn: Callable, *args) -> Any:
    _init_worker(threads)
    return fn(*args)


def run_sweep(cfg: SweepConfig, out: PathLike, *, workers: int | None = None, backend: str = "local",
              address: str | None = None, retry_failed: bool = False, progress: bool = True,
              cache: PathLike | None = None, on_line: Callable[[dict], None] | None = None) -> SweepSummary:
    """Run the cells of `cfg` not yet in `out` (JSONL, appended). Float models are trained first and
    cached in `cache` (default: beside `out`, `<name>.floats/`); `workers` processes (default: one
    per core) or Ray tasks run them. Ctrl-C stops the workers; every finished line is kept."""
    from tqdm.auto import tqdm

    from qexport.fileio import atomic_path

    out = Path(out)
    t0 = time.perf_counter()
    done = {r["key"]: r for r in read_results(out)}
    if retry_failed:
        done = {k: r for k, r in done.items() if r.get("status") == "ok"}
    cells = cfg.cells()
    todo = [c for c in cells if c.key not in done]
    summary = SweepSummary(len(cells), len(cells) - len(todo), 0, 0, 0.0)
    if not todo:
        return summary
    cache = Path(cache) if cache else out.with_name(out.name.removesuffix(".jsonl") + ".floats")
    fields = dataclasses.asdict(cfg)
    need = {(c.dataset, c.model, c.seed) for c in todo}
    floats = {(ds, m.label, s): str(cache / f"float-{float_key(cfg, ds, m, s)}.safetensors")
              for ds, m, s in cfg.floats() if (ds, m.label, s) in need}
    workers = workers or os.cpu_count() or 1
    pool = RayPool(workers, address) if backend == "ray" else LocalPool(min(workers, max(len(todo), 1)))
    bar = tqdm(total=len(floats) + len(todo), desc="sweep", unit="run", disable=not progress, smoothing=0.05)
    try:
        failed_floats: dict[tuple, str] = {}
        blobs = {k: Path(p).read_bytes() for k, p in floats.items() if Path(p).is_file()}
        jobs = {pool.submit(train_float, fields, cfg.data_path(ds), cfg.model(ds, label), s): (ds, label, s)
                for (ds, label, s) in floats if (ds, label, s) not in blobs}
        bar.update(len(blobs))
        for fut in pool.completed(list(jobs)):
            try:
                blobs[jobs[fut]] = blob = pool.result(fut)
                cache.mkdir(parents=True, exist_ok=True)
                with atomic_path(floats[jobs[fut]]) as tmp:
                    tmp.write_bytes(blob)
            except BrokenProcessPool:
                raise WorkerDied(f"training the float model of {' '.join(map(str, jobs[fut]))}") from None
            except Exception as e:  # noqa: BLE001 - its cells record the error
                failed_floats[jobs[fut]] = f"float model: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            bar.update(1)
        futures = {}
        for c in todo:
            j = Job(cfg.data_path(c.dataset), cfg.data_dir, blobs.get((c.dataset, c.model, c.seed)), cfg.model(c.dataset, c.model), cfg.verify_samples,
                    cfg.source, cfg.device)
            if (c.dataset, c.model, c.seed) in failed_floats:
                rec = {"schema": SCHEMA, "key": c.key, "cell": dataclasses.asdict(c), "config": cfg.source,
                       "status": "error", "error": failed_floats[(c.dataset, c.model, c.seed)]}
                _record(out, rec, summary, bar, on_line)
            else:
                futures[pool.submit(run_cell, c, j)] = c
        for fut in pool.completed(list(futures)):
            try:
                rec = pool.result(fut)
            except Exception:  # noqa: BLE001 - run_cell never raises: the worker itself died
                raise WorkerDied(f"running {cell_name(dataclasses.asdict(futures[fut]))}") from None
            _record(out, rec, summary, bar, on_line)
    except WorkerDied as e:
        pool.close(cancel=True)
        pool = None
        raise UserError(f"a worker process died {e} (killed, or out of memory?): the {summary.ok + summary.failed} cells "
                        f"finished are in {out}; run the same command again to go on (fewer --workers if memory is short)") from None
    except KeyboardInterrupt:
        summary.interrupted = True
        pool.close(cancel=True)
        pool = None
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _record(out: Path, rec: dict, summary: SweepSummary, bar: Any, on_line: Callable[[dict], None] | None) -> None:
    append_line(out, rec)
    if rec["status"] == "ok":
        summary.ok += 1
    else:
        summary.failed += 1
    bar.update(1)
    if on_line is not None:
        on_line(rec)


def cell_name(c: dict) -> str:
    return f"{c['dataset']} {c['model']} {c['method']} {c['bits']}b{' per-channel' if c['per_channel'] else ''} seed {c['seed']}"


def describe_cell(rec: dict) -> str:
    """One line for a finished cell (the CLI prints it as lines arrive)."""
    what = cell_name(rec["cell"])
    if rec["status"] != "ok":
        return f"  FAILED {what}: {rec['error']}"
    v = rec.get("verify")
    check = f"  verify {'PASSED' if v['passed'] else 'FAILED'}" if v else ""
    return f"  {what}: {rec['acc']:.2f}% (float {rec['float_acc']:.2f}%){check}  {rec['seconds']['total']:.1f} s"
