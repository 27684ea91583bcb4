"""`qexport verify`: onnxruntime against a PyTorch reference that repeats the graph's arithmetic.

The reference is built from the *artifact* (codes, α, biases, BatchNorm, normalisation), not from
the ONNX file, so a flipped code, a wrong scale or a missing normalisation in the file shows up as
a difference. Only the activation quantization parameters (a property of the export, calibrated at
export time) are read from the file.

Each (form, session mode) is judged against the reference that describes what onnxruntime runs:
- `weights` (float Gemm/Conv on W = α·Q): the same graph in float64 is the truth; onnxruntime's
  relative error against it may be what fp32 arithmetic itself costs on this model and input, i.e.
  up to `rel_factor` times PyTorch's own fp32 error against it (at least `rel`). Deep nets sum in
  another order than PyTorch and land 1e-5 away from it; a wrong code or scale lands far beyond.
  Top-1 agreement counts only the samples whose two best float64 logits are further apart than
  that bound (the others may swap under any fp32 order).
- `qdq` / `qoperator` fused (optimisations on; `qoperator` always): the integer pipeline as
  onnxruntime runs it on x86 (toolchains.md §3): QuantizeLinear = round_half_even(clamp(x / s,
  -zp, 255 - zp)) + zp (divide, not multiply by 1/s); QLinearConv/QGemm: int32 acc =
  Σ(x_q - x_zp)·w_q + b_q, then fp32(acc)·m with m = (x_s·w_s)/y_s computed in fp32 in that order,
  clamp, round half to even, add y_zp. QLinearAdd and QLinearGlobalAveragePool are emulated in fp32
  the way MLAS computes them; their vector kernels may still differ by one step at exact ties,
  hence a tolerance of one output step.
- `qdq` unfused (optimisations off): every layer runs in fp32 between DequantizeLinear and
  QuantizeLinear, so a rounding tie may land one step from the integer kernel in any layer, and
  the next layers carry it on (tens of steps at the output of a deep net). Each layer is checked on
  its own: the reference op applied to onnxruntime's own inputs of that layer must give its output
  within one step (the raw input is quantized by the reference, so a wrong input stage still
  shows). The output's difference is reported, not judged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from qadmm.errors import BadFile, UserError
from qadmm.train import agreement
from qexport.graph import apply_op, evaluate, fuse
from qexport.onnx.builder import read_metadata
from qexport.ops.emit import integer_layer, qname
from qexport.onnx.forms import FORMS
from qexport.ops.integer import QParams, from_uint8, to_uint8
from qexport.onnx.integer_graph import computes_float, float_values, reads_input
from qexport.ops import KINDS
from qexport.ops.base import INPUT, OUTPUT, Ctx, Op
from qexport.cpu import cpu_has_vnni
from qexport.onnx.runner import SATURATION_SAFE_CODE, load_onnx, max_code



@dataclass
class Tolerance:
    rel: float = 1e-5  # weights: max |Δ| / max |float64 reference|, at least this much allowed
    rel_factor: float = 8.0  # weights: ... or this many times PyTorch's own fp32 error, if larger
    steps: float = 1.0  # integer forms: max |Δ| in output quantization steps (unfused qdq: per layer)
    agreement_weights: float = 100.0  # % top-1 agreement (weights: on the samples fp32 cannot swap)
    agreement_integer: float = 99.9


# ---------------------------------------------------------------------------------------------
# The integer reference (ORT x86 arithmetic, `qexport.ops.integer`), op by op through the kinds.

def reference_ctx(art, ops: list[Op], qp: dict[str, QParams], floats: set[str] | None) -> Ctx:
    """What the integer reference computes with: the artifact's codes, the activation parameters and
    the values kept in float (`floats`, by default those `float_values` allows)."""
    return Ctx(None, art.layers, qp, None, art.graph.shapes, floats=float_values(ops, art.layers) if floats is None else floats)


@torch.no_grad()
def integer_reference(art, ops: list[Op], qp: dict[str, QParams], x: torch.Tensor,
                      islands: set[str] | None = None, every_value: bool = True,
                      floats: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Every uint8 value of the qdq/qoperator graph (as int64 tensors, keyed by tensor name), and
    the float `logits`, computed from the artifact with onnxruntime's integer arithmetic; the
    values computed by float islands are added to `islands` when given; a value the graph keeps
    in float (`floats`, by default `float_values`) is a float32 tensor. With `every_value` False
    only the output is kept (each value is freed after its last reader: a large graph's values,
    as int64, would not fit in memory at once)."""
    ctx = reference_ctx(art, ops, qp, floats)
    q: dict[str, torch.Tensor] = {}
    last = {v: k for k, op in enumerate(ops) for v in op.inputs}
    if INPUT in qp:
        q[INPUT] = to_uint8(x, qp[INPUT])
    for k, op in enumerate(ops):
        q[op.out] = integer_op(ctx, op, [] if KINDS[op.kind].float_input else [q[i] for i in op.inputs], x, qp, islands)
        if not every_value:
            for i in set(op.inputs):
                if last.get(i) == k and i != OUTPUT and i in q:
                    del q[i]
    out = {qname(v): t for v, t in q.items()}
    out[OUTPUT] = from_uint8(q[OUTPUT], qp[OUTPUT])
    return out


def integer_op(ctx: Ctx, op: Op, qin: list[torch.Tensor], x: torch.Tensor, qp: dict[str, QParams],
               islands: set[str] | None = None) -> torch.Tensor:
    """One op's uint8 output (int64 tensor) from its inputs' values `qin` (uint8 as int64, or
    float32 for a value kept in float); `x`, the raw input, for an op that reads it (the
    normalisation; `qin` is then empty). A value in `ctx.floats` comes back in float32."""
    kind = KINDS[op.kind]
    integer = not kind.float_input and kind.runs_integer(op, ctx.layers) and not computes_float(ctx, op)
    y = kind.integer(ctx, op, qin) if integer else None
    raw = kind.input_qparams(op, qp[op.out]) if kind.float_input else None
    if raw is not None:  # folded into the input's QuantizeLinear
        y = to_uint8(x, raw)
    if y is None:  # float island: DQ -> float op -> Q (minus what stays float)
        if islands is not None and not kind.float_input:
            islands.add(op.out)
        xs = [x] if kind.float_input else [v if v.is_floating_point() else from_uint8(v, qp[i]) for v, i in zip(qin, op.inputs)]
        f = apply_op(op, xs)
        if op.out in ctx.floats:
            return f.to(torch.float32)
        y = to_uint8(f, qp[op.out])
    return y.to(torch.int64)


@torch.no_grad()
def layerwise_steps(art, ops: list[Op], qp: dict[str, QParams], x: torch.Tensor,
                    got: dict[str, np.ndarray], floats: set[str] | None = None) -> list[dict]:
    """Per op, in execution order: the reference op applied to onnxruntime's own uint8 inputs of
    that op (`got`, by tensor name), against onnxruntime's output of it; max |Δ| in steps. The raw
    input is quantized by the reference; a value onnxruntime does not expose is the reference's."""
    ctx = reference_ctx(art, ops, qp, floats)
    vals: dict[str, torch.Tensor] = {}
    out = []
    if INPUT in qp:
        vals[INPUT] = to_uint8(x, qp[INPUT]).to(torch.int64)
        if qname(INPUT) in got:  # the input stage itself: onnxruntime's QuantizeLinear of the raw input
            d = (torch.as_tensor(got[qname(INPUT)].astype(np.int64)) - vals[INPUT]).abs()
            out.append({"layer": INPUT, "tensor": qname(INPUT), "max_steps": float(d.max()), "share_differing": float((d > 0).double().mean())})
    last = {v: k for k, op in enumerate(ops) for v in op.inputs}
    for k, op in enumerate(ops):
        y = integer_op(ctx, op, [] if KINDS[op.kind].float_input else [vals[i] for i in op.inputs], x, qp)
        for i in set(op.inputs):  # (int64 values of a large graph would not fit in memory at once)
            if last.get(i) == k:
                vals.pop(i, None)
        name = qname(op.out)
        if name in got and tuple(got[name].shape) == tuple(y.shape):
            g = torch.as_tensor(got[name].astype(np.int64))
            d = (g - y).abs()
            out.append({"layer": op.name, "tensor": name, "max_steps": float(d.max()) if d.numel() else 0.0,
                        "share_differing": float((d > 0).double().mean()) if d.numel() else 0.0})
            vals[op.out] = g
        else:
            if name in got:
                out.append({"layer": op.name, "tensor": name, "max_steps": float("inf"),
                            "reason": f"shape {tuple(got[name].shape)} in onnxruntime vs {tuple(y.shape)} in the reference"})
            vals[op.out] = y
    return out


def float64_ops(art) -> list[Op]:
    """The `weights` graph's ops in float64, on a copy of the same fp32 weights (α·Q, folded
    BatchNorm parameters): they compute the exact value fp32 arithmetic approximates, in any
    summation order (`evaluate(ops, x.double())`)."""
    import copy

    from qexport.graph import bind

    return fuse(bind(art.graph, copy.deepcopy(art.model).double()))


def float_reference(ops: list[Op], x: torch.Tensor) -> dict[str, torch.Tensor]:
    vals = evaluate(ops, x)
    vals.pop(INPUT)
    return vals


def file_ops(model, art) -> list[Op]:
    """The ops an integer file was written from: `fuse`'s, or, for a file written before `fuse` split
    SiLU into a sigmoid and a product (no node yields the sigmoid's value), the unsplit ones."""
    ops = fuse(art.graph)
    added = {op.out for op in ops} - {op.out for op in art.graph.ops}
    produced = {o for n in model.graph.node for o in n.output}
    if added and not any(qname(v) in produced or f"{v}.float" in produced for v in added):
        return fuse(art.graph, split_silu=False)
    return ops


def kept_float(model, ops: list[Op], layers: dict) -> set[str]:
    """The values the file keeps in float: of those `float_values` allows, the ones no node of it
    quantizes (a file written before float islands passed float values on quantizes every one,
    and is judged as what it is)."""
    produced = {o for n in model.graph.node for o in n.output}
    return {v for v in float_values(ops, layers) if qname(v) not in produced}


def read_qparams(model, ops: list[Op], floats: set[str] = frozenset()) -> dict[str, QParams]:
    """Activation scales and zero points from the file (`<tensor>.scale`, `<tensor>.zero_point`);
    a value kept in float (`floats`) has them only when a move of it is quantized."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    qp: dict[str, QParams] = {}

    def get(v: str) -> QParams:
        s, z = f"{qname(v)}.scale", f"{qname(v)}.zero_point"
        if s not in inits or z not in inits:
            raise UserError(f"the graph has no quantization parameters for {qname(v)} ({s}): it was not exported "
                            f"from this artifact's model, or was edited")
        return QParams(np.float32(numpy_helper.to_array(inits[s])), np.uint8(numpy_helper.to_array(inits[z])))

    if reads_input(ops):
        qp[INPUT] = get(INPUT)
    for op in ops:
        if KINDS[op.kind].pass_through and op.inputs[0] in qp:
            qp[op.out] = qp[op.inputs[0]]
        elif op.out not in floats or f"{qname(op.out)}.scale" in inits:
            qp[op.out] = get(op.out)
    return qp


def check_initializers(model, art, ops: list[Op], qp: dict[str, QParams] | None, form: str) -> list[str]:
    """Layers whose codes, weight scale or int32 bias in the file differ from what the artifact
    gives (exact comparison: catches a corruption too small to move any output by a step)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}

    def arr(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    bad = []
    for op in ops:
        if op.kind not in ("linear", "conv") or op.name not in art.layers:
            continue
        lc = art.layers[op.name]
        if not FORMS[form].integer:
            want = {"codes": lc.q.numpy(), "alpha": lc.alpha.numpy()}
        else:
            il = integer_layer(op, lc, qp[op.inputs[0]].scale)
            want = {"codes": il.q, "w_scale": il.w_scale, "bias_int32": il.bias}
        for key, w in want.items():
            got = arr(f"{op.name}.{key}")
            if key == "alpha" and got is not None and got.size == w.size:
                got = got.reshape(w.shape)  # stored (C, 1, ...) to broadcast in Mul
            if got is None or got.shape != w.shape or not np.array_equal(got.astype(np.float64), w.astype(np.float64)):
                bad.append(f"{op.name}.{key}")
    return bad


# ---------------------------------------------------------------------------------------------
# Running onnxruntime and comparing.

def _settings(form: str, model) -> dict[str, tuple[str, dict[str, str]]]:
    """Session settings verified: optimisations off, all on (with what keeps the file faithful,
    none for a `weights` file written with Cast · α), and for a `weights` file that needs a
    setting, the plain defaults (reported, not judged)."""
    from qexport.onnx.runner import faithful_config  # noqa: I001

    config = faithful_config(model)
    out = {"optimizations_off": ("disable", {}), "optimizations_all": ("all", config)}
    if not FORMS[form].integer and config:
        out["ort_defaults"] = ("all", {})
    return out


def _with_outputs(model, names: list[str], elem_type: int):
    """A copy of the model that also returns the named intermediate tensors."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    produced = {o for n in m.graph.node for o in n.output}
    for n in names:
        if n not in have and n in produced:
            m.graph.output.append(helper.make_tensor_value_info(n, elem_type, None))
    return m


def _batches(model, level: str, config: dict, x: np.ndarray, batch_size: int, names: list[str] | None = None,
             elem_type: int = 1):
    """onnxruntime's outputs (and the named intermediate tensors) batch by batch: (start, {name: array})."""
    from qexport.onnx.runner import make_session, run_session

    m = _with_outputs(model, names, elem_type) if names else model
    sess = make_session(m.SerializeToString(), level=level, config=config, threads=0)
    out_names = [o.name for o in sess.get_outputs()]
    for i in range(0, len(x), batch_size):
        yield i, dict(zip(out_names, run_session(sess, x[i:i + batch_size])))


def _run(model, level: str, config: dict, x: np.ndarray, batch_size: int, names: list[str] | None = None, elem_type: int = 1):
    chunks: dict[str, list] = {}
    for _, outs in _batches(model, level, config, x, batch_size, names, elem_type):
        for n, v in outs.items():
            chunks.setdefault(n, []).append(v)
    return {n: np.concatenate(v) for n, v in chunks.items()}


def _layerwise_run(model, level: str, config: dict, art, ops: list[Op], qp: dict, x: np.ndarray, batch_size: int,
                   floats: set[str]):
    """The graph's output, and per layer the worst difference of onnxruntime's output from the
    reference op applied to onnxruntime's own inputs (`layerwise_steps`), over every batch."""
    names = [qname(INPUT)] + [qname(op.out) for op in ops if op.out != OUTPUT]
    outputs, worst = [], {}
    for i, outs in _batches(model, level, config, x, min(batch_size, 64), names, elem_type=2):
        outputs.append(outs[OUTPUT])
        xt = torch.as_tensor(np.ascontiguousarray(x[i:i + min(batch_size, 64)], dtype=np.float32))
        for rec in layerwise_steps(art, ops, qp, xt, outs, floats):
            w = worst.setdefault(rec["tensor"], dict(rec))
            w["max_steps"] = max(w["max_steps"], rec["max_steps"])
            w["share_differing"] = max(w.get("share_differing", 0.0), rec.get("share_differing", 0.0))
    return np.concatenate(outputs), list(worst.values())


def check_signature(model, art, model_path: str) -> None:
    """The graph takes what the artifact's model takes (raw features of its input shape, any batch)
    and returns its output shape: otherwise it was not exported from this artifact."""
    from qexport.artifact import output_shape

    def dims(vi) -> list:
        return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]

    arch = art.meta["architecture"]
    want_in, want_out = list(arch["input_shape"]), output_shape(arch)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    got_in, got_out = dims(inputs[0])[1:], dims(model.graph.output[0])[1:]
    if got_in != want_in or got_out != want_out:
        raise UserError(f"{model_path} maps {got_in} to {got_out} per sample, but the artifact's model maps {want_in} to "
                        f"{want_out}: it was not exported from this artifact (export it with `qexport to-onnx`)")


def verify(model_path: str, art, x: np.ndarray, y: np.ndarray | None, tol: Tolerance | None = None,
           batch_size: int = 256, divergence_samples: int = 256, model=None) -> dict:
    """Compare onnxruntime with the reference on x; the JSON-ready report (`passed` says it all)."""

    tol = tol or Tolerance()
    model = model if model is not None else load_onnx(model_path)
    meta = read_metadata(model)
    form = meta.get("qexport.form")
    if form not in FORMS:  # (a file another tool wrote, or a form this version does not know)
        raise UserError(f"{model_path} was not written by `qexport to-onnx` (no qexport.form in its metadata): "
                        f"`qexport run` evaluates any ONNX classifier, `verify` needs a qexport export")
    check_signature(model, art, model_path)
    integer = FORMS[form].integer
    ops = file_ops(model, art) if integer else fuse(art.graph)
    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    try:
        floats = kept_float(model, ops, art.layers) if integer else set()
        qp = read_qparams(model, ops, floats) if integer else None
    except (ValueError, TypeError, IndexError) as e:  # a quantization parameter of the wrong type or shape
        if isinstance(e, UserError):
            raise
        raise BadFile(f"{model_path}: its quantization parameters are malformed ({e}); it was edited or corrupted") from None
    refs, islands = [], set()
    for i in range(0, len(xt), batch_size):
        r = integer_reference(art, ops, qp, xt[i:i + batch_size], islands, every_value=False, floats=floats) if integer \
            else {OUTPUT: evaluate(ops, xt[i:i + batch_size], keep=False)[OUTPUT]}
        refs.append(r[OUTPUT].numpy())
    ref = np.concatenate(refs).reshape(len(xt), -1)  # per sample, flattened (any output shape)
    classifier = "num_classes" in art.meta["architecture"]  # class scores: top-1 agreement is judged too
    step = float(qp[OUTPUT].scale) if integer else None
    if not integer:  # the float64 truth, and what fp32 arithmetic itself costs against it
        ops64 = float64_ops(art)
        ref64 = np.concatenate([evaluate(ops64, xt[i:i + batch_size].double(), keep=False)[OUTPUT].numpy()
                                for i in range(0, len(xt), batch_size)]).reshape(len(xt), -1)
        scale64 = max(float(np.abs(ref64).max()), 1e-30)
        rel_torch = float(np.abs(ref.astype(np.float64) - ref64).max() / scale64)
        rel_allowed = max(tol.rel, tol.rel_factor * rel_torch)
        top2 = np.sort(ref64, axis=1)[:, -2:] if ref64.shape[1] > 1 and classifier else np.zeros((len(ref64), 2))
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * rel_allowed * scale64  # fp32 in any order keeps its top-1
    with torch.no_grad():
        fake = torch.cat([art.model(xt[i:i + batch_size]) for i in range(0, len(xt), batch_size)]).numpy()
    layer_names = [qname(op.out) if integer else op.out for op in ops if op.out != OUTPUT]
    div: dict = {}

    def div_ref() -> dict[str, torch.Tensor]:  # every value on a few samples, for the first divergence (once)
        if not div:
            div.update(integer_reference(art, ops, qp, xt[:divergence_samples], floats=floats) if integer
                       else float_reference(ops, xt[:divergence_samples]))
        return div

    def acc(logits):
        return None if y is None or not classifier else round(float((logits.reshape(len(logits), -1).argmax(1) == y).mean() * 100), 3)

    report = {
        "model": str(model_path), "form": form, "artifact_sha256": art.sha256, "samples": int(len(x)),
        "artifact_matches_metadata": meta.get("qexport.artifact_sha256") == art.sha256,
        "tolerance": asdict(tol), "output_step": step,
        "accuracy": {"reference": acc(ref), "fake_quant_float_activations": acc(fake)},
        "runs": {},
    }
    report["initializers_differing"] = check_initializers(model, art, ops, qp, form)
    passed = report["artifact_matches_metadata"] and not report["initializers_differing"]
    saturation_risk = FORMS[form].always_integer_kernels and max_code(model) > SATURATION_SAFE_CODE and cpu_has_vnni() is False
    for key, (level, config) in _settings(form, model).items():
        # float islands compute in fp32 in onnxruntime's own kernels (another summation order, other
        # Erf/Exp): a QuantizeLinear after one may round a tie the other way, and deep graphs carry
        # that step on; such graphs (and unfused qdq, float convolutions) are judged layer by layer
        unfused = not FORMS[form].always_integer_kernels and level == "disable"  # float ops on dequantized values
        layerwise = integer and (unfused or bool(islands))
        if layerwise:
            got, layers = _layerwise_run(model, level, config, art, ops, qp, x, batch_size, floats)
        else:
            got = _run(model, level, config, x, batch_size)[OUTPUT]
        got = got.reshape(len(got), -1)
        d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        agree = float((got.argmax(1) == ref.argmax(1)).mean() * 100) if classifier else 100.0
        run = {"level": level, "session_config": config, "accuracy": acc(got), "top1_agreement": round(agree, 4),
               "max_abs": float(d.max()), "mean_abs": float(d.mean()),
               **agreement(torch.as_tensor(ref), torch.as_tensor(got), False)}
        if layerwise:
            # judged layer by layer; the output's difference (ties carried on) is reported
            run["reference"] = "per layer: the reference op on onnxruntime's own inputs of the layer" + (
                f" ({len(islands)} float island(s) computed by onnxruntime in fp32)" if islands else "")
            run["max_steps"] = round(float(d.max() / step), 3)
            run["mean_steps"] = float(d.mean() / step)
            run["max_steps_layerwise"] = max((r["max_steps"] for r in layers), default=0.0)
            run["max_steps_allowed"] = tol.steps
            ok = run["max_steps_layerwise"] <= tol.steps
            bad = [r for r in layers if r["max_steps"] > tol.steps]
            run["first_divergence"] = bad[0] if bad else None
        elif integer:
            run["reference"] = "the integer reference, end to end"
            # |Δ| of dequantized fp32 outputs is k·step up to float rounding: round to 1e-3 step
            run["max_steps"] = round(float(d.max() / step), 3)
            run["mean_steps"] = float(d.mean() / step)
            run["max_steps_allowed"] = tol.steps
            ok = run["max_steps"] <= tol.steps and agree >= tol.agreement_integer
        else:
            run["reference"] = "the graph in float64, within what fp32 arithmetic costs"
            d64 = np.abs(got.astype(np.float64) - ref64)
            run["max_abs"], run["mean_abs"] = float(d64.max()), float(d64.mean())
            run["rel_error"] = float(d64.max() / scale64)
            run["rel_error_pytorch_fp32"] = rel_torch
            run["rel_allowed"] = rel_allowed
            run["ambiguous_samples"] = int((~decisive).sum())
            agree = float((got.argmax(1) == ref64.argmax(1))[decisive].mean() * 100) if decisive.any() and classifier else 100.0
            run["top1_agreement_decisive"] = round(agree, 4)
            ok = run["rel_error"] <= rel_allowed and agree >= tol.agreement_weights
        if not layerwise:
            run["first_divergence"] = _first_divergence(model, level, config, x[:divergence_samples], div_ref(), layer_names,
                                                        integer, tol, qp, ops, batch_size,
                                                        rel=None if integer else rel_allowed)
        run["passed"] = bool(ok)
        if not ok and key == "optimizations_off" and saturation_risk:
            run["judged"] = False
            run["note"] = (f"this x86 CPU has no VNNI: onnxruntime's u8·s8 kernels saturate int16 pair sums for weight "
                           f"codes above ±{SATURATION_SAFE_CODE}, and with optimisations off nothing converts them; "
                           f"deploy with all optimisations and session.x64quantprecision=1 (judged below)")
        elif key != "ort_defaults":
            passed &= ok
        report["runs"][key] = run
    report["passed"] = bool(passed)
    return report


def _first_divergence(model, level, config, x, ref, names, integer, tol, qp, ops, batch_size, rel: float | None = None) -> dict | None:
    """The first value (in execution order) where onnxruntime and the reference part: for integer
    forms a difference of more than `tol.steps` in that tensor's own steps (any difference is
    listed too), for `weights` a relative error above `rel` (the run's allowance)."""
    outs = _run(model, level, config, x, batch_size, names, elem_type=2 if integer else 1)
    first_any = None
    for op in ops:
        name = qname(op.out) if integer else op.out
        if name not in outs:
            continue
        r = ref[name].numpy().astype(np.float64)
        g = outs[name].astype(np.float64)
        if r.shape != g.shape:
            return {"layer": op.name, "tensor": name, "reason": f"shape {g.shape} in onnxruntime vs {r.shape} in the reference"}
        d = np.abs(g - r)
        worst = float(d.max()) if d.size else 0.0
        if integer:
            info = {"layer": op.name, "tensor": name, "max_steps": worst, "share_differing": float((d > 0).mean())}
            if worst > 0 and first_any is None:
                first_any = info
            if worst > tol.steps:
                return {**info, "first_any_difference": first_any}
        else:
            err = worst / max(float(np.abs(r).max()), 1e-30)
            if err > (rel if rel is not None else tol.rel):
                return {"layer": op.name, "tensor": name, "rel_error": err}
    return {"first_any_difference": first_any} if first_any else None
