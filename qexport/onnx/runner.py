"""`qexport run`: accuracy and latency of any ONNX classifier in onnxruntime, or its predictions.

Works on graphs qexport did not write: the input is the graph's first input, features are
reshaped to its static dimensions when the element counts agree (e.g. MNIST (1,28,28) into a
784-wide MLP), and the batch axis may be dynamic or fixed.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qadmm.errors import BadData, BadFile, UserError
from qexport.cpu import cpu_has_vnni

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
# What keeps qexport's graphs faithful to the reference and fast (see docs/onnx.md). A `weights`
# file written with DequantizeLinear (`--dequant dequantizelinear`): by default ORT ≥ 1.20 keeps
# every DQ node (dequantizing all weights on every run) and fuses DQ(INT4/INT8) -> MatMul into
# kernels that quantize activations; `session.disable_quant_qdq=1` folds the DQ nodes into fp32
# weights at load instead. The default Cast · α files need nothing.
# On x86 without VNNI the u8·s8 kernels add pairs of products in int16 with saturation
# (VPMADDUBSW): int8 weights above ±64 can overflow. `session.x64quantprecision=1` (applied with
# all optimisations) converts the weights to u8 with zero point 128, computed exactly, at about
# half the int8 speed; codes within ±63 (`--bits 7`, onnxruntime's reduce_range) never overflow
# (2·255·64 < 2^15) and need nothing.
SATURATION_SAFE_CODE = 64


def faithful_config(model, vnni: bool | None | str = "this cpu") -> dict[str, str]:
    """Session config entries that make onnxruntime compute what the qexport reference computes,
    fast, on a CPU with `vnni` (default: this one; None = not x86), read from the graph (empty
    for graphs qexport did not write, and for most qexport files)."""
    from qexport.onnx.forms import FORMS

    meta = {p.key: p.value for p in model.metadata_props}
    form = meta.get("qexport.form")
    vnni = cpu_has_vnni() if vnni == "this cpu" else vnni
    if form in FORMS and not FORMS[form].integer:
        # (of qexport's codes: a file another tool quantized from a qexport fp32 export keeps our metadata)
        has_dq = any(n.op_type == "DequantizeLinear" and n.input[0].endswith(".codes") for n in model.graph.node)
        return {"session.disable_quant_qdq": "1"} if has_dq else {}
    if form in FORMS and FORMS[form].integer and vnni is False and max_code(model) > SATURATION_SAFE_CODE:
        return {"session.x64quantprecision": "1"}  # costs about half the int8 speed: 7-bit codes avoid it
    return {}


def max_code(model) -> int:
    from onnx import numpy_helper

    codes = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith(".codes")]
    return max((int(np.abs(c.astype(np.int64)).max(initial=0)) for c in codes), default=0)


def load_onnx(path: str | Path):
    """An ONNX model from a file, checked for what every command needs (a graph with one input
    and an output, weights inside the file); a BadFile for anything else. Nothing it names runs.
    The last file read is kept (a command reads it more than once), keyed by the file's identity
    and modification, so a file written again at the same path is read again."""
    try:
        st = Path(path).stat()
    except OSError:
        return _load_onnx(str(path), None)  # (read_bytes says what is wrong with the path)
    return _load_onnx(str(path), (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=1)
def _load_onnx(path: str, identity: tuple | None):
    import onnx

    from qexport.fileio import read_bytes

    raw = read_bytes(path)
    try:
        model = onnx.load_model_from_string(raw)
    except Exception as e:  # protobuf's DecodeError and friends
        raise BadFile(f"{path} is not a readable ONNX model ({type(e).__name__}); is it truncated or another kind of file?") from None
    g = model.graph
    if not g.node or len(g.input) - len({t.name for t in g.initializer} & {i.name for i in g.input}) != 1 or not g.output:
        raise BadFile(f"{path} is not an ONNX classifier qexport can run (it needs one input, one or more outputs and "
                      f"at least one node; it has {len(g.input)} inputs, {len(g.output)} outputs, {len(g.node)} nodes)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer):
        raise BadFile(f"{path} keeps its weights in external data files; save it as one file "
                      "(onnx.save(model, path, save_as_external_data=False))")
    return model


def run_session(sess, x: np.ndarray) -> list[np.ndarray]:
    """All outputs of one run on x; onnxruntime's failures (a graph that loads but cannot run on
    this input) as one UserError."""
    try:
        return sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception as e:  # onnxruntime's Fail/InvalidArgument/RuntimeException
        raise BadFile(f"onnxruntime failed running the graph on input {x.shape}: {str(e).strip().splitlines()[0][:300]}") from None


def make_session(model: bytes | str, level: str = "all", config: dict[str, str] | None = None, threads: int = 0,
                 profile_prefix: str | None = None):
    """An onnxruntime CPU session with the given optimisation level, config entries and threads
    (0 = onnxruntime's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        where = model if isinstance(model, str) else "the graph"
        raise BadFile(f"onnxruntime cannot load {where}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}") from None


def fit_input(sess, x: np.ndarray) -> np.ndarray:
    """x as float32, reshaped to the graph input's static feature dims when the counts agree."""
    inp = sess.get_inputs()[0]
    if inp.type != "tensor(float)":
        raise UserError(f"the graph's input {inp.name!r} has type {inp.type}; `qexport run` feeds float32 features")
    dims = inp.shape[1:]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if all(isinstance(d, int) for d in dims) and tuple(dims) != x.shape[1:]:
        # only flattening (or unflattening) is implied; (H, W, C) into (C, H, W) would be silently wrong
        flat = len(dims) == 1 or x.ndim == 2
        if int(np.prod(dims)) != int(np.prod(x.shape[1:])) or not flat:
            hint = (" (channels-last? transpose to (N, C, H, W))" if len(dims) == 3 and x.ndim == 4
                    and tuple(x.shape[1:]) == (*dims[1:], dims[0]) else "")
            raise BadData(f"the graph expects samples of shape {tuple(dims)}, the data has {x.shape[1:]}{hint}")
        x = x.reshape(len(x), *dims)
    return x


def fixed_batch(sess) -> int | None:
    d = sess.get_inputs()[0].shape[0]
    return d if isinstance(d, int) else None


def predict(sess, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The first output for all of x, in batches (a fixed batch axis is honoured, the tail padded)."""
    x = fit_input(sess, x)
    fb = fixed_batch(sess)
    bs = fb or batch_size
    out = []
    for i in range(0, len(x), bs):
        xb = x[i:i + bs]
        n = len(xb)
        if fb and n < fb:
            xb = np.concatenate([xb, np.zeros((fb - n, *xb.shape[1:]), np.float32)])
        out.append(run_session(sess, xb)[0][:n])
    return np.concatenate(out)


@dataclass
class Latency:
    batch_size: int
    median_ms: float
    p90_ms: float
    runs: int


def latency(sess, x: np.ndarray, batch_size: int, repeats: int = 50, warmup: int = 5) -> Latency:
    """Median wall time of `repeats` runs of one batch (after `warmup` runs)."""
    x = fit_input(sess, x)
    bs = fixed_batch(sess) or batch_size
    xb = x[:bs]
    if len(xb) < bs:
        xb = np.concatenate([xb] * (-(-bs // len(xb))))[:bs]
    name = sess.get_inputs()[0].name
    run_session(sess, xb)  # a clear error if the graph cannot run, before timing
    for _ in range(warmup):
        sess.run(None, {name: xb})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {name: xb})
        times.append((time.perf_counter() - t0) * 1000)
    return Latency(bs, float(np.median(times)), float(np.percentile(times, 90)), repeats)


@dataclass
class NodeTime:
    """One graph node's kernel time in onnxruntime's profile, per run."""

    node: str
    op_type: str
    median_us: float  # over the runs
    share: float  # of all node kernel time (sum of medians)


def profile(model: bytes, x: np.ndarray, batch_size: int, level: str = "all", config: dict[str, str] | None = None,
            threads: int = 0, repeats: int = 50) -> list[NodeTime]:
    """Per-node kernel times of `repeats` runs of one batch under onnxruntime's profiler (the nodes
    as onnxruntime runs them, after its fusions), slowest first. Profiling adds its own overhead:
    time with `latency`, find where the time goes with this."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qexport-profile-") as tmp:
        sess = make_session(model, level, config, threads, profile_prefix=str(Path(tmp) / "ort"))
        latency(sess, x, batch_size, repeats, warmup=5)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    durs: dict[str, list[float]] = {}
    kind: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        durs.setdefault(name, []).append(float(e["dur"]))
        kind[name] = e.get("args", {}).get("op_name", "?")
    med = {n: float(np.median(d)) for n, d in durs.items()}  # the median: one preempted run is not the node's cost
    whole = sum(med.values()) or 1.0
    return sorted((NodeTime(n, kind[n], t, t / whole) for n, t in med.items()), key=lambda r: -r.median_us)


def load_input_array(path: str) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # not .npy, truncated, pickled objects (refused)
        raise BadData(f"cannot read {path} as a .npy array of numbers ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    if not isinstance(x, np.ndarray) or x.ndim < 2 or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise BadData(f"{path}: expected a real numeric array of shape (N, features...), got {getattr(x, 'dtype', type(x).__name__)} "
                      f"{getattr(x, 'shape', '')}")
    if not np.isfinite(x).all():
        raise BadData(f"{path}: the array holds NaN or infinite values")
    return x
