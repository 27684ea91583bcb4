"""`qexport analyze`: which layer hurts, per layer and bit width."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from qadmm.errors import UserError
from qexport.cli.options import SEED, data_file, data_options, factory_file, normalize_option, parse_bits


def table(sens) -> str:
    """Layers × widths: the layer's output SQNR (dB) and the network's metric with only it quantized."""
    head = ["layer", "params"] + [f"{b}b dB / {sens.metric[:3]}" for b in sens.bits]
    rows = [[s.name, str(s.params)] + [f"{s.sqnr_db[b]:5.1f} / {s.metric[b]:6.2f}" if math.isfinite(s.sqnr_db[b])
                                         else f"  inf / {s.metric[b]:6.2f}" for b in sens.bits] for s in sens.layers]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in [head, *rows])


def along_table(steps, float_metric: float) -> str:
    """Per layer of a quantized model: its output SQNR, the metric with it alone and with every layer up to it."""
    rows = [["layer", "dB", "alone", "cumulative", "step"]]
    prev = float_metric
    for s in steps:
        rows.append([s.name, "inf" if not math.isfinite(s.sqnr_db) else f"{s.sqnr_db:.1f}", f"{s.alone:.2f}",
                     f"{s.cumulative:.2f}", f"{s.cumulative - prev:+.2f}"])
        prev = s.cumulative
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)


@click.command()
@data_options
@click.option("--model", "model_name", default=None,
              help="Zoo model, or your own: module:factory or path/to/file.py:factory (default: the dataset's zoo model).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Float weights: a qexport checkpoint, or a state_dict for --model module:factory. Without it the "
                   "float model is trained first.")
@normalize_option
@click.option("--bits", "bits_text", default="8,4,3,2,1", show_default=True, help="Widths to try, comma-separated.")
@click.option("--per-channel", is_flag=True, help="One scale per output channel (as you would quantize).")
@click.option("--method", default="ptq", show_default=True,
              help="How each layer is rounded: ptq (its nearest α/Q fit), or gptq / ldnq (their layer solver, on the "
                   "layer's input Hessian): analyze with the method you will quantize with.")
@click.option("--calib-samples", type=click.IntRange(1), default=512, show_default=True,
              help="Training inputs for each layer's input Hessian (the SQNR).")
@click.option("--eval-samples", type=click.IntRange(1), default=2000, show_default=True,
              help="Test samples for the network's accuracy (or agreement) with one layer quantized.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--artifact", type=click.Path(dir_okay=False), default=None,
              help="A quantized model of this float model: also show where its accuracy goes, each of its layers put "
                   "into the float model alone and cumulatively in forward order.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON here.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Also write a report into this folder: report.md, report.html and figures/ (heat maps of the SQNR "
                   "and of the drop, layers by widths; the accuracy along the network with --artifact).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def analyze(data_name, data_dir, label_column, model_name, checkpoint, normalize, bits_text, per_channel, method, calib_samples,
            eval_samples, seed, artifact, json_path, report_dir, quiet):
    """Which layer hurts: each quantizable layer quantized alone, at each width.

    Per layer and width: the layer's own output SQNR in dB on calibration inputs (nearest α/Q fit,
    as ptq makes it, or --method gptq / ldnq; higher is better), and the network's test accuracy with only that layer
    quantized (top-1 agreement with the float model, or SQNR, when the data has no labels). The
    most sensitive layers are the ones to keep at more bits (`quantize --layer-bits`).

    \b
    Examples:
      qexport analyze --checkpoint models/fashion-resnet20.safetensors --data fashion-mnist --per-channel --report sens/
      qexport analyze --checkpoint models/digits-mlp.safetensors --bits 4,2,1 --method gptq --json sens.json
      qexport analyze --checkpoint models/digits-mlp.safetensors --artifact m.qx.safetensors --per-channel
    """
    from qexport.provenance import is_user_model
    from qexport import analyze_report
    from qexport import api
    from qexport.fileio import atomic_path, check_output_path
    from qexport.workflow import float_model, load_data

    bits = parse_bits(bits_text, "--bits")
    user = is_user_model(model_name)
    if normalize not in (None, "none") and not user:
        raise UserError("--normalize is for your own model (--model module:factory): zoo models and qexport "
                        "checkpoints carry their own normalisation")
    inputs = [checkpoint, data_file(data_name), factory_file(model_name), artifact]
    if json_path:
        check_output_path(json_path, inputs)
    if report_dir:
        analyze_report.check_out_dir(report_dir, inputs)
    art = api.load(artifact) if artifact else None
    data = load_data(data_name, data_dir, seed, label_column)
    model, name, _ = float_model(data, model_name, checkpoint, seed, None, 3e-3, 32, 30, not quiet, normalize)
    if user and normalize not in (None, "none"):
        model = api.with_normalization(model, api.normalization(normalize, data))
    result = api.analyze(model, data, bits, per_channel=per_channel, method=method, artifact=art, calib_samples=calib_samples,
                         eval_samples=eval_samples, seed=seed, progress=not quiet)
    sens = result.sensitivity
    click.echo(f"{name} on {data.name}: each layer quantized alone by {method} ({'per channel' if per_channel else 'per tensor'}); "
               f"float {sens.metric} {sens.float_metric:.2f} on {min(eval_samples, len(data.x_test))} test samples")
    click.echo(table(sens))
    for b in bits:
        worst = sens.ranking(b)[:3]
        click.echo(f"  most sensitive at {b} bits: {', '.join(worst)}")
    if result.along is not None:
        metric, float_metric, steps = result.along
        click.echo(f"{artifact} along the network ({metric}; float {float_metric:.2f}, the quantized model itself "
                   f"{result.quantized_metric:.2f}):")
        click.echo(along_table(steps, float_metric))
    if json_path:
        with atomic_path(json_path) as tmp:
            Path(tmp).write_text(json.dumps({"model": name, "data": data.name, **result.to_json()}, indent=1))
        click.echo(f"wrote {json_path}")
    if report_dir:
        files = analyze_report.write(report_dir, f"{name} on {data.name}", sens, result.along, result.quantized_metric,
                                     inputs=inputs)
        click.echo(f"wrote {files.markdown}, {files.html} and {len(files.figures)} figures")
