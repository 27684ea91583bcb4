"""`qexport to-onnx`, `qexport verify`, `qexport run`."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from qadmm.errors import UserError

from qexport.cli.options import SEED, Finite, data_file
from qexport.onnx.export import DEQUANT
from qexport.onnx.forms import FORMS, NAMES as FORM_NAMES


def _dataset(art, data_name, data_dir, seed):
    """The dataset named, or the artifact's own (same name and seed) when none is."""
    from qadmm.data import check_input_shape
    from qexport.workflow import load_data

    ds = art.meta.get("dataset", {})
    name = data_name or ds.get("name")
    label_column = None
    if not data_name and name in ("npz", "csv", "arrays"):  # a file: read it again from where it was
        name, label_column = ds.get("source"), ds.get("label_column")
        if not name or not Path(name).is_file():
            raise UserError(f"the artifact's data ({name or 'arrays'}) is not readable here: name it with --data "
                            "(a dataset name or a .npz/.csv path)")
    if not name:
        raise UserError("name the data with --data (a dataset name or a .npz/.csv path)")
    data = load_data(name, data_dir, ds.get("seed", 0) if seed is None else seed, label_column)
    check_input_shape(data, tuple(art.meta["architecture"]["input_shape"]), "the artifact's model")
    return data


def _data_opts(f):
    f = click.option("--seed", type=SEED, default=None, help="Split seed (default: the artifact's).")(f)
    f = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Folder with DIR/<dataset>/ (default: $QEXPORT_DATA, else ./data).")(f)
    f = click.option("--data", "data_name", default=None, help="Dataset name or .npz path (default: the artifact's dataset).")(f)
    return f


@click.command("to-onnx")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="ONNX path (default: ARTIFACT stem + .<form>.onnx).")
@click.option("--form", type=click.Choice(FORM_NAMES), default="qdq", show_default=True,
              help="weights: integer weights, float compute. qdq: Q/DQ pairs, fused to integer kernels. "
                   "qoperator: QLinearConv/QGemm graph.")
@_data_opts
@click.option("--calibration", type=click.Choice(["minmax", "percentile"]), default="minmax", show_default=True,
              help="Activation range estimate (integer forms).")
@click.option("--percentile", type=Finite(0, 100, min_open=True), default=99.99, show_default=True, help="Share of values kept by --calibration percentile.")
@click.option("--calib-batches", type=click.IntRange(1), default=8, show_default=True, help="Training batches for calibration.")
@click.option("--calib-batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--opset", type=click.IntRange(13, 25), default=None,
              help="ONNX opset to write (default: the lowest the graph needs). Below 25, 2-bit codes are stored as "
                   "INT4; below 21, as INT8 (older onnxruntime reads them; the file is larger). to-onnx prints the "
                   "oldest onnxruntime that loads the file it wrote.")
@click.option("--dequant", type=click.Choice(DEQUANT), default="cast", show_default=True,
              help="weights form: how codes become float weights. cast: Cast·α, folded by onnxruntime at load "
                   "(fp32 speed with default settings). dequantizelinear: DequantizeLinear nodes, for runtimes that "
                   "want them (onnxruntime needs session.disable_quant_qdq=1 to be fast and exact).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def to_onnx(artifact, output, form, data_name, data_dir, seed, calibration, percentile, calib_batches, calib_batch_size,
            opset, dequant, quiet):
    """Export an artifact to ONNX (normalisation inside, dynamic batch, provenance in metadata).

    \b
    Examples:
      qexport to-onnx digits-mlp-digits-ptq-4b.qx.safetensors --form weights -o digits-4b.onnx
      qexport to-onnx model.qx.safetensors --form qdq                    # calibrates on the artifact's data
      qexport to-onnx model.qx.safetensors --form qoperator --calibration percentile --calib-batches 32
      qexport to-onnx model.qx.safetensors --form weights --opset 13     # onnxruntime >= 1.6 (INT8 codes)
    """
    from qexport import api
    from qexport.artifact import load_artifact
    from qexport.fileio import check_output_path

    out = Path(output or f"{Path(artifact).name.split('.')[0]}.{form}.onnx")
    check_output_path(out, [artifact, data_file(data_name)])
    art = load_artifact(artifact)
    data = None
    integer = FORMS[form].integer
    if integer:
        from qexport.onnx.integer_graph import check_int8

        check_int8(art)  # before loading data
        data = _dataset(art, data_name, data_dir, seed)
    if dequant != "cast" and integer:
        raise UserError(f"--dequant applies to --form weights only (form {form} runs integer kernels)")
    from qexport.onnx.compat import requirement

    model = api.to_onnx(art, out, form, data, opset, calibration, percentile, calib_batches, calib_batch_size,
                        progress=not quiet, dequant=dequant)
    click.echo(f"wrote {out} ({out.stat().st_size} bytes, form {form}, {art.bits_summary}); "
               f"check it with: qexport verify {out} --artifact {artifact}")
    click.echo(requirement(model).describe())
    from qexport.onnx.runner import SATURATION_SAFE_CODE

    top = max((int(lc.q.abs().max()) for lc in art.layers.values()), default=0)
    if integer and top > SATURATION_SAFE_CODE:
        click.echo(f"note: codes reach ±{top}; on x86 CPUs without VNNI onnxruntime computes them exactly only with "
                   f"session.x64quantprecision=1, about half the int8 speed (`qexport run`/`verify` set it there). "
                   f"`qexport quantize --bits 7` keeps codes within ±63: exact at full speed everywhere "
                   f"(onnxruntime's reduce_range)")


@click.command()
@click.argument("model_path", metavar="MODEL.onnx|C_FOLDER", type=click.Path(exists=True))
@click.option("--artifact", required=True, type=click.Path(dir_okay=False), help="The artifact the graph was exported from.")
@_data_opts
@click.option("--max-samples", type=click.IntRange(1), default=None, help="Use the first N test samples (default: all).")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
@click.option("--rel-tol", type=Finite(0), default=1e-5, show_default=True,
              help="weights: max |Δ| / max |float64 reference| always allowed; more where PyTorch's own fp32 "
                   "error on the model is larger (8× it).")
@click.option("--step-tol", type=Finite(0), default=1.0, show_default=True,
              help="qdq/qoperator: max |Δ| in output steps (qdq with optimisations off: per layer).")
@click.option("--min-agreement", type=Finite(0, 100), default=None, help="Top-1 agreement in %% (default 100 for weights, 99.9 otherwise).")
@click.option("--cortex-m4", type=click.IntRange(0), default=0, show_default=True,
              help="C folders: also build for a Cortex-M4 and run the first N samples in QEMU (needs "
                   "gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm).")
def verify(model_path, artifact, data_name, data_dir, seed, max_samples, report, rel_tol, step_tol, min_agreement, cortex_m4):
    """Check onnxruntime against the exact PyTorch reference of the artifact; exit 1 on failure.

    Runs onnxruntime with graph optimisations off and all on (with the session settings
    `qexport run` adds, printed; none for most files), and names the first layer where the
    outputs part. A file that needs a setting is also run with plain defaults (reported, not
    judged).

    \b
    A folder written by `qexport to-c` is built with this machine's C compiler and run on the test
    samples; its outputs must equal the integer reference's and onnxruntime's (QOperator, the
    same activation parameters) exactly.

    \b
    Examples:
      qexport verify digits-4b.onnx --artifact digits-mlp-digits-ptq-4b.qx.safetensors
      qexport verify model.qdq.onnx --artifact model.qx.safetensors --report verify.json --max-samples 1000
      qexport verify r20_c/ --artifact resnet20-2b.qx.safetensors --cortex-m4 100
    """
    from qexport.artifact import load_artifact
    from qexport.fileio import atomic_path
    from qexport.onnx.verify import Tolerance
    from qexport.onnx.verify import verify as run_verify

    from qexport.fileio import check_output_path

    if report:
        check_output_path(report, [model_path, artifact, data_file(data_name)])
    art = load_artifact(artifact)
    data = _dataset(art, data_name, data_dir, seed)
    x, y = data.x_test[:max_samples], data.y_test[:max_samples] if data.labelled else None
    if Path(model_path).is_dir():
        from qexport.pack.c_integer import cortex_m4_tools, format_report as format_c, verify_folder

        if cortex_m4 and cortex_m4_tools():
            raise UserError(f"--cortex-m4: {cortex_m4_tools()}")
        rep = verify_folder(model_path, art, x, y, cortex_m4)
        click.echo(format_c(rep))
    else:
        tol = Tolerance(rel=rel_tol, steps=step_tol)
        if min_agreement is not None:
            tol.agreement_weights = tol.agreement_integer = min_agreement
        rep = run_verify(model_path, art, x, y, tol)
        click.echo(format_report(rep))
    if report:
        with atomic_path(report) as tmp:
            Path(tmp).write_text(json.dumps(rep, indent=2))
        click.echo(f"wrote {report}")
    if not rep["passed"]:
        raise SystemExit(1)


def format_report(rep: dict) -> str:
    lines = [f"{rep['model']} ({rep['form']}) vs the reference of artifact {rep['artifact_sha256'][:12]} on {rep['samples']} samples"]
    if not rep["artifact_matches_metadata"]:
        lines.append("  FAIL: the graph's metadata names another artifact (qexport.artifact_sha256 differs)")
    if rep["initializers_differing"]:
        lines.append(f"  FAIL: initializers differ from the artifact's codes/scales: {', '.join(rep['initializers_differing'][:6])}")
    acc = rep["accuracy"]
    if acc["reference"] is not None:
        lines.append(f"  accuracy: reference {acc['reference']:.2f}%  (float activations: {acc['fake_quant_float_activations']:.2f}%)")
    for key, r in rep["runs"].items():
        if "max_steps_layerwise" in r:
            err = (f"per layer max {r['max_steps_layerwise']:g} steps (allowed {r['max_steps_allowed']:g}); "
                   f"output max {r['max_steps']:g} steps (not judged: ties carried on)")
        elif "max_steps" in r:
            err = f"max {r['max_steps']:g} steps, mean {r['mean_steps']:.4f}"
        else:
            err = (f"rel {r['rel_error']:.2e} (allowed {r['rel_allowed']:.1e}; PyTorch's fp32: "
                   f"{r['rel_error_pytorch_fp32']:.1e}), max |Δ| {r['max_abs']:.3g}")
        verdict = "PASS" if r["passed"] else ("not judged" if key == "ort_defaults" or r.get("judged") is False else "FAIL")
        a = f"{r['accuracy']:.2f}%" if r["accuracy"] is not None else "-"
        cfg = " ".join(f"{k}={v}" for k, v in r["session_config"].items()) or ("default session settings" if r["level"] == "all" else "")
        sqnr = f"SQNR {r['sqnr_db']:.1f} dB" if r.get("sqnr_db") is not None else "identical"
        lines.append(f"  {key:18s} {verdict:10s} acc {a:8s} agree {r['top1_agreement']:.2f}%  {sqnr}  {err}"
                     + (f"  [{cfg}]" if cfg else ""))
        if r.get("reference"):
            lines.append(f"    against: {r['reference']}")
        fd = r.get("first_divergence")
        if fd and fd.get("layer"):
            lines.append(f"    first layer out of tolerance: {fd['layer']} (tensor {fd['tensor']}): "
                         + (f"{fd['max_steps']:g} steps" if "max_steps" in fd else fd.get("reason", f"rel {fd.get('rel_error', 0):.2e}")))
        if fd and fd.get("first_any_difference"):
            f1 = fd["first_any_difference"]
            lines.append(f"    first difference: {f1['layer']} ({f1['max_steps']:g} step, {100 * f1['share_differing']:.4f}% of values)")
        if r.get("note"):
            lines.append(f"    note: {r['note']}")
    lines.append("PASSED" if rep["passed"] else "FAILED")
    return "\n".join(lines)


@click.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False, exists=True))
@click.option("--data", "data_name", default=None, help="Dataset (name or .npz): accuracy on its test split, and latency.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Split seed of --data.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, exists=True), default=None, help="A .npy array of raw features: predict it.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="With --input: write the outputs (logits) here (.npy).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=50, show_default=True, help="Timed runs for the latency median.")
@click.option("--threads", type=click.IntRange(0), default=2, show_default=True, help="onnxruntime intra-op threads (0 = its default).")
@click.option("--opt-level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all", show_default=True)
@click.option("--ort-defaults", is_flag=True, help="Do not add the session settings that keep qexport graphs exact.")
@click.option("--profile", "top", type=click.IntRange(0), default=0, metavar="N",
              help="Also profile one batch and print the N slowest nodes (as onnxruntime runs them, after its "
                   "fusions) and the time per operator type.")
def run(model_path, data_name, data_dir, seed, input_path, output, batch_size, repeats, threads, opt_level, ort_defaults, top):
    """Run any ONNX classifier: accuracy and latency on a dataset, or predictions for an array.

    \b
    Examples:
      qexport run digits-4b.onnx --data digits
      qexport run model.qdq.onnx --data mnist-10k --data-dir ../shared/data --batch-size 1 --repeats 200
      qexport run model.onnx --input samples.npy -o logits.npy
      qexport run model.qoperator.onnx --data fashion-mnist --batch-size 1 --profile 10
    """
    from qexport.onnx import runner
    from qexport.fileio import atomic_path, check_output_path

    if bool(data_name) == bool(input_path):
        raise UserError("give exactly one of --data (accuracy and latency) or --input x.npy (predictions)")
    if top and not data_name:
        raise UserError("--profile times a batch of --data; give --data")
    if output and not input_path:
        raise UserError("-o/--output writes predictions for --input; with --data nothing is written")
    out = Path(output or Path(input_path).with_suffix(".pred.npy")) if input_path else None
    if out is not None:
        check_output_path(out, [model_path, input_path])
    proto = runner.load_onnx(model_path)
    config = {} if ort_defaults else runner.faithful_config(proto)
    sess = runner.make_session(proto.SerializeToString(), opt_level, config, threads)
    if input_path:
        x = runner.load_input_array(input_path)
        logits = runner.predict(sess, x, batch_size)
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, logits)
        click.echo(f"{len(x)} samples -> {out} (outputs {logits.shape}, argmax = predicted class)")
        return
    from qexport.workflow import load_data

    data = load_data(data_name, data_dir, seed, None)
    if not data.labelled:
        raise UserError(f"dataset {data.name!r} has no labels: `run --data` measures accuracy; use --input X.npy for outputs")
    logits = runner.predict(sess, data.x_test, 256)
    if logits.ndim != 2:
        raise UserError(f"the graph's first output has shape {logits.shape[1:]} per sample; `run --data` expects class scores")
    acc = float((logits.argmax(1) == data.y_test).mean() * 100)
    lat = runner.latency(sess, data.x_test, batch_size, repeats)
    cfg = " ".join(f"{k}={v}" for k, v in config.items()) or "none"
    click.echo(f"{model_path} on {data.name} test ({len(data.y_test)} samples): accuracy {acc:.2f}%")
    click.echo(f"latency batch {lat.batch_size}: median {lat.median_ms:.3f} ms, p90 {lat.p90_ms:.3f} ms "
               f"({lat.runs} runs, {threads or 'default'} threads, opt {opt_level}, session config: {cfg})")
    if top:
        click.echo(format_profile(runner.profile(proto.SerializeToString(), data.x_test, batch_size, opt_level, config,
                                                 threads, repeats), top))


def format_profile(rows, top: int) -> str:
    """The `top` slowest nodes and the kernel time per operator type, from `runner.profile`."""
    total = sum(r.median_us for r in rows)
    lines = [f"profile: {len(rows)} nodes, {total:.1f} µs of kernels per run (medians; onnxruntime's profiler, its "
             f"overhead included); slowest nodes:"]
    lines += [f"  {r.median_us:9.1f} µs {100 * r.share:5.1f}%  {r.op_type:22s} {r.node}" for r in rows[:top]]
    by_type: dict[str, list] = {}
    for r in rows:
        by_type.setdefault(r.op_type, []).append(r.median_us)
    lines.append("by operator type:")
    lines += [f"  {sum(v):9.1f} µs {100 * sum(v) / (total or 1):5.1f}%  {t} x{len(v)}"
              for t, v in sorted(by_type.items(), key=lambda kv: -sum(kv[1]))]
    return "\n".join(lines)
