"""The `qexport` command line: train, quantize, inspect (and the export commands added beside)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from qadmm.errors import UserError
from qexport.cli.options import SEED, Group, data_file, data_options, factory_file, normalize_option, parse_bits, train_options
from qexport.workflow import float_model, load_data, preprocessing

EPILOG_QUANTIZE = """\b
Examples:
  qexport quantize                                  # digits, mlp-digits, the default method, 4 bits
  qexport quantize --data seeds --data-dir ../shared/data --bits 2 --scheme thesis
  qexport quantize --checkpoint models/digits-mlp.safetensors --bits 1 -o digits-1b.qx.safetensors
  qexport quantize --data mnist-10k --method ptq --bits 8 --per-channel
  qexport quantize --checkpoint models/digits-mlp.safetensors --method md-tanh --bits 1
  qexport quantize --checkpoint models/digits-mlp.safetensors --method admm-q --bits 1 --param random=0.3
  qexport quantize --checkpoint models/fashion-cnn-small.safetensors --data fashion-mnist \
      --method gptq --bits 4 --per-channel          # calibration only: 2,048 images, seconds
  qexport quantize --checkpoint models/fashion-resnet20.safetensors --data fashion-mnist \
      --method ldnq --bits 2 --per-channel --calib-samples 4096
"""


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="qexport")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """qexport: quantize PyTorch models to 1/2/4/8-bit integer weights and deploy them.

    \b
    Typical flow:
      qexport train    -o digits.safetensors                      # float model (digits)
      qexport quantize --checkpoint digits.safetensors --bits 2 -o d2.qx.safetensors   # LQ
      qexport inspect  d2.qx.safetensors                          # codes, scales, sizes
      qexport to-onnx  d2.qx.safetensors -o d2.onnx --form qoperator
      qexport verify   d2.onnx --artifact d2.qx.safetensors       # onnxruntime vs PyTorch
      qexport run      d2.onnx                                    # accuracy and latency
      qexport pack     d2.qx.safetensors -o d2.qpk.safetensors    # 2 bits per weight
      qexport to-c     d2.qx.safetensors -o d2_c/                 # C99 for a microcontroller
      qexport sweep    grid.toml -o results.jsonl                 # a grid of experiments
      qexport report   results.jsonl -o report/                   # tables and figures
    """
    ctx.ensure_object(dict)["debug"] = debug


@main.command()
@data_options
@click.option("--model", "model_name", default=None, help="Zoo model (mlp-seeds, mlp-pendigits, mlp-mnist, mlp-digits, "
              "cnn-small, resnet20) or package.module:factory. Default: the dataset's thesis topology.")
@train_options
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint path (.safetensors; a .json card is written beside it).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@normalize_option
def train(data_name, data_dir, label_column, model_name, epochs, lr, batch_size, patience, seed, output, quiet, normalize):
    """Train a float model from the zoo on a dataset and write a checkpoint.

    \b
    Examples:
      qexport train                                   # mlp-digits on digits
      qexport train --data pendigits --data-dir ../shared/data -o pendigits.safetensors
      qexport train --data digits --model cnn-small --epochs 60
    """
    from qexport.api import normalization
    from qexport.checkpoint import card_path, save_checkpoint
    from qexport.fileio import check_output_path
    from qexport.provenance import command_line, float_card

    from qadmm.zoo import NAMES

    inputs = (data_file(data_name), factory_file(model_name))
    if output:
        check_output_path(output, inputs, [card_path(output)])
    data = load_data(data_name, data_dir, seed, label_column)
    out = Path(output or f"{data.name}-{(model_name or 'default').replace(':', '_').replace('/', '_')}.safetensors")
    check_output_path(out, inputs, [card_path(out)])
    model, name, info = float_model(data, model_name, None, seed, epochs, lr, batch_size, patience, not quiet, normalize)
    arch = {"model": name, "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    pre = preprocessing(data) if name in NAMES else normalization(normalize, data)
    card = save_checkpoint(out, model, float_card(arch, pre, data.describe(), info, command_line(sys.argv[1:])))
    click.echo(f"float {arch['model']} on {data.name}: val {info['val_acc']:.2f}%  test {info['test_acc']:.2f}%  "
               f"({info['epochs_run']} epochs, {info['seconds']} s)")
    click.echo(f"wrote {out} and {card}")


def parse_params(items: tuple[str, ...]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param {item!r}: write it as name=value, e.g. --param rho=0.01")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def layer_table(history: list) -> str:
    """The method's per-layer log (rows that name a "layer") as an aligned text table; '' if none."""
    rows = [r for r in history if isinstance(r, dict) and "layer" in r]
    if not rows:
        return ""
    cols = [k for k, v in rows[0].items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def parse_bytes(text: str) -> int:
    """60KB (×1000), 48KiB (×1024), 1MB, 61440 (bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB)?\s*", text, flags=re.I)
    if not m:
        raise UserError(f"--size-budget {text!r}: give bytes, e.g. 61440, 60KB or 48KiB")
    unit = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 2**20}[(m.group(2) or "").lower()]
    return int(float(m.group(1)) * unit)


@main.command(epilog=EPILOG_QUANTIZE)
@data_options
@click.option("--model", "model_name", default=None,
              help="Zoo model, or your own: module:factory (current directory or PYTHONPATH) or path/to/file.py:factory "
                   "(default: the dataset's zoo model).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Float weights: a qexport checkpoint, or a state_dict for --model package.module:factory. "
                   "Without it the float model is trained first.")
@click.option("--method", default="lq", show_default=True,
              help="Back-end: lq, gptq, ldnq, ptq, ste, admm-q, proxquant, md-tanh, md-softmax, askewsgd, qnn-admm "
                   "(see --list-methods).")
@click.option("--bits", type=int, default=4, show_default=True, help="Bits per weight code (1-8).")
@click.option("--scheme", type=click.Choice(["binary", "symmetric", "thesis"]), default=None,
              help="Code set: binary {-1,+1} (1 bit), symmetric ±(2^(N-1)-1) (default for N>=2), thesis ±(2^N-1).")
@click.option("--per-channel", is_flag=True, help="One scale per output channel instead of one per tensor.")
@click.option("--keep-first", is_flag=True, help="Leave the first Linear/Conv2d layer float.")
@click.option("--keep-last", is_flag=True, help="Leave the last Linear/Conv2d layer float.")
@click.option("--layer-bits", default=None, metavar="PATTERN=BITS,...",
              help="Per-layer bit widths (mixed precision), e.g. 'conv1=8,fc*=2'; fnmatch patterns on layer names "
                   "(see `qexport inspect`), the first match wins; other layers get --bits.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave matching layers float (repeatable).")
@click.option("--size-budget", default=None, metavar="BYTES",
              help="Mixed precision: choose a width per layer from --bit-choices so the quantized layers' codes and "
                   "scales fit in this many bytes (e.g. 60KB, 48KiB, 61440); the most sensitive layers get more bits.")
@click.option("--avg-bits", type=float, default=None, metavar="BITS",
              help="Mixed precision: at most this many code bits per weight on average (e.g. 2.5), instead of or "
                   "besides --size-budget.")
@click.option("--max-drop", type=float, default=None, metavar="POINTS",
              help="Mixed precision: the smallest model (under --size-budget/--avg-bits, if given) whose accuracy on "
                   "the validation split is at most this many points below the float model's (top-1 agreement without "
                   "labels). Each try is one quantization; exit status 1 when no allowed model meets it.")
@click.option("--bit-choices", default="8,4,2,1", show_default=True,
              help="Widths --size-budget/--avg-bits/--max-drop may choose from.")
@click.option("--allow-float", is_flag=True, help="Mixed precision may keep a layer float (4 B per weight).")
@click.option("--max-steps", type=click.IntRange(1), default=None,
              help="Quantizations the search may run: a --max-drop search's tries (default 6); under --size-budget/"
                   "--avg-bits alone, how many of the best allocations to quantize and compare on the validation split, "
                   "keeping the most accurate (default 1).")
@normalize_option
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Method hyperparameter override (repeatable).")
@click.option("--calib-samples", type=click.IntRange(1), default=2048, show_default=True,
              help="Training images for calibration: GPTQ/LDNQ layer inputs and BatchNorm re-estimation.")
@click.option("--bn-reestimate/--no-bn-reestimate", default=None,
              help="Recompute BatchNorm statistics with the quantized weights afterwards "
                   "(default: on for every method but lq and qnn-admm, which train it on the final codes; see --list-methods).")
@click.option("--bias-correction/--no-bias-correction", default=None,
              help="Nagel et al. 2019 bias correction of quantized layers with no BatchNorm after them "
                   "(default: on for gptq, ldnq; off otherwise).")
@click.option("--device", default="cpu", show_default=True, help="Where training-based back-ends run: cpu, cuda, cuda:1 ...")
@train_options
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for splits, training and the method.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Artifact path (default printed).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--list-methods", is_flag=True, help="List the back-ends and their hyperparameters, then exit.")
def quantize(data_name, data_dir, label_column, model_name, checkpoint, method, bits, scheme, per_channel, keep_first,
             keep_last, layer_bits, exclude, size_budget, avg_bits, max_drop, bit_choices, allow_float, max_steps, normalize, params, calib_samples, bn_reestimate, bias_correction, device, epochs,
             lr, batch_size, patience, seed, output, quiet, list_methods):
    """Quantize a float model's weights to integer codes and scales; write the artifact."""
    from qadmm import methods
    from qexport.provenance import is_user_model
    from qexport import api
    from qexport.checkpoint import card_path
    from qexport.config import config
    from qexport.provenance import Provenance, command_line
    from qexport.describe import describe_agreement, describe_mixed, describe_preprocessing
    from qexport.mixed import Budget
    from qexport.fileio import check_output_path

    if list_methods:
        for name, m in methods.METHODS.items():
            fields = ", ".join(f"{k}={v}" for k, v in m.defaults().items())
            flags = [text for on, text in ((m.calibration_only, "calibration only"), (m.recalibrate, "BatchNorm re-estimated"),
                                           (m.bias_correction, "bias corrected"), (m.hooks is not None, "trains in your loop too"))
                     if on]
            click.echo(f"{name:10s} {m.summary}\n{'':10s} {fields}" + (f"\n{'':10s} [{', '.join(flags)}]" if flags else ""))
        return
    lbits = parse_layer_bits(layer_bits)
    budget = None
    if size_budget is not None or avg_bits is not None or max_drop is not None:
        budget = Budget(size_bytes=None if size_budget is None else parse_bytes(size_budget), avg_bits=avg_bits,
                        max_drop=max_drop, bit_choices=tuple(parse_bits(bit_choices)), allow_float=allow_float,
                        max_steps=max_steps)
    # the whole request, checked before any training
    request = config(method, bits=bits, scheme=scheme, per_channel=per_channel, keep_first=keep_first, keep_last=keep_last,
                     seed=seed, params=parse_params(params), calib_samples=calib_samples, bn_reestimate=bn_reestimate,
                     bias_correction=bias_correction, device=device, layer_bits=lbits, exclude=tuple(exclude))
    user = is_user_model(model_name)
    if normalize not in (None, "none") and not user:
        raise UserError("--normalize is for your own model (--model module:factory): zoo models and qexport "
                        "checkpoints carry their own normalisation")
    inputs = (checkpoint, checkpoint and card_path(checkpoint), data_file(data_name), factory_file(model_name))
    if output:
        check_output_path(output, inputs)
    data = load_data(data_name, data_dir, seed, label_column)
    model, name, source = float_model(data, model_name, checkpoint, seed, epochs, lr, batch_size, patience, not quiet,
                                      normalize)
    out = Path(output or f"{data.name}-{Path(name).stem.replace(':', '_')}-{method}-{bits}b.qx.safetensors")
    check_output_path(out, inputs)
    art = api.quantize(model, data, request, normalize=normalize if user and checkpoint else None, progress=not quiet,
                       budget=budget, provenance=Provenance(name, source or {}, command_line(sys.argv[1:])))
    digest = art.save(out)
    m = art.meta
    acc = m["accuracy"]
    click.echo(f"{name} on {data.name} ({len(data.x_test)} test samples), {method}, {art.bits_summary}"
               f"{', per-channel' if per_channel else ''}; input {describe_preprocessing(m['preprocessing'])}:")
    if acc["float_test"] is not None:
        click.echo(f"  float     test accuracy {acc['float_test']:6.2f}%")
        click.echo(f"  quantized test accuracy {acc['quantized_test']:6.2f}%   ({m['method']['seconds']:.1f} s)")
    else:  # unlabelled data: how close the quantized model's outputs are to the float model's
        click.echo(f"  agreement with the float model on the test inputs: {describe_agreement(m['agreement'])}"
                   f"   ({m['method']['seconds']:.1f} s)")
    if "mixed_precision" in m:
        click.echo(describe_mixed(m["mixed_precision"]))
    table = layer_table(m["history"])
    if table:
        click.echo(table)
    grid = next((r for r in m["history"] if isinstance(r, dict) and "on_grid_fraction" in r), None)
    if grid:
        click.echo(f"  weights already on the grid before the final rounding: {100 * grid['on_grid_fraction']:.1f}% "
                   f"(within 5% of a step; epoch {grid['selected_epoch']} selected on validation)")
    rc = m["recalibration"]
    if rc:
        done = [f"BatchNorm re-estimated ({rc['bn_layers']} layers)" if rc.get("bn_reestimate") else "",
                f"bias corrected ({', '.join(rc['bias_corrected']) or 'no layer qualified'})" if rc.get("bias_correction") else ""]
        click.echo(f"  {' and '.join(d for d in done if d)} on {rc['calib_samples']} training images")
    click.echo(f"wrote {out}  (sha256 {digest[:12]})")
    if m.get("mixed_precision", {}).get("met") is False:
        raise SystemExit(1)  # the artifact is written (the closest allowed model), but the target is not met


def parse_layer_bits(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        pat, sep, bits = item.partition("=")
        try:
            out[pat.strip()] = int(bits)
        except ValueError:
            raise UserError(f"--layer-bits {item!r}: write PATTERN=BITS, e.g. --layer-bits 'conv1=8,fc*=2'") from None
        if not sep or not pat.strip():
            raise UserError(f"--layer-bits {item!r}: write PATTERN=BITS, e.g. --layer-bits 'conv1=8,fc*=2'")
    return out


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON instead of tables.")
def inspect(path, as_json):
    """Show a qexport file: per-layer codes, scales and sizes, and its metadata.

    \b
    Example:
      qexport inspect digits-mlp-digits-ptq-4b.qx.safetensors
    """
    from qexport.describe import describe

    click.echo(describe(path, as_json))


from qexport.cli.onnx import run as _run_cmd, to_onnx as _to_onnx_cmd, verify as _verify_cmd  # noqa: E402

main.add_command(_to_onnx_cmd)
main.add_command(_verify_cmd)
main.add_command(_run_cmd)

from qexport.cli.pack import pack as _pack_cmd, to_c as _to_c_cmd, unpack as _unpack_cmd  # noqa: E402

main.add_command(_pack_cmd)
main.add_command(_unpack_cmd)
main.add_command(_to_c_cmd)

from qexport.cli.analyze import analyze as _analyze_cmd  # noqa: E402
from qexport.cli.report import report as _report_cmd  # noqa: E402
from qexport.cli.sweep import sweep as _sweep_cmd  # noqa: E402

main.add_command(_analyze_cmd)
main.add_command(_sweep_cmd)
main.add_command(_report_cmd)

if __name__ == "__main__":
    main()
