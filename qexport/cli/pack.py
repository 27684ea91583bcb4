"""`qexport pack`, `qexport unpack`, `qexport to-c`: bit-packed binaries and C99 sources."""
from __future__ import annotations

from pathlib import Path

import click

from qexport.cli.options import SEED
from qexport.fileio import check_output_path


def _beside(path: str, suffix: str) -> Path:
    """The default output: PATH's name with its qexport suffix replaced, in PATH's folder."""
    name = Path(path).name
    for old in (".qx.safetensors", ".qpk.safetensors", ".safetensors"):
        if name.endswith(old):
            return Path(path).with_name(name[: -len(old)] + suffix)
    return Path(path).with_name(Path(path).stem + suffix)


@click.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Packed file (default: ARTIFACT's name with .qpk.safetensors).")
def pack(artifact, output):
    """Pack an artifact's weight codes at exactly N bits each into a safetensors file.

    Binary layers take 1 bit per weight (sign bit, 1 = -1), symmetric N-bit layers N bits, the
    thesis scheme N+1 bits (two's complement, ONNX INT4/INT2 bit order); the layout is in
    docs/packing.md. Scales, biases and the input normalisation stay float32.

    \b
    Examples:
      qexport pack digits-mlp-digits-ptq-2b.qx.safetensors
      qexport pack model.qx.safetensors -o model.qpk.safetensors
      qexport inspect model.qpk.safetensors          # bytes per layer against float32
    """
    from qexport.pack.packfile import pack_file

    out = check_output_path(Path(output) if output else _beside(artifact, ".qpk.safetensors"), [artifact])
    packed = pack_file(artifact, out)
    s = packed.sizes()
    widths = ", ".join(sorted({f"{lay.codes.scheme} {lay.codes.bits}-bit at {lay.width} bit{'s' * (lay.width > 1)}/weight"
                               for lay in packed.layers})) or "no quantized layers"
    click.echo(f"{len(packed.layers)} quantized layers ({widths}): payload {s['payload']} B, scales {s['scales']} B, "
               f"float tensors {s['floats']} B")
    ratio = s["float32_model"] / packed.file_bytes
    size = (f"{ratio:.1f}x smaller than float32, {s['float32_model']} B" if ratio >= 1 else
            f"{1 / ratio:.1f}x larger than float32, {s['float32_model']} B: the stored graph outweighs the weights")
    click.echo(f"wrote {out}: {packed.file_bytes} bytes ({size})  sha256 {packed.content_sha256[:12]}")


@click.command()
@click.argument("packed", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Artifact path (default: PACKED's name with .unpacked.qx.safetensors).")
def unpack(packed, output):
    """Restore a loadable artifact (exact codes, scales and float tensors) from a packed file.

    The artifact works with every other command (inspect, to-onnx, verify). The per-iteration
    history of the original artifact is not in the packed file; its sha256 is recorded.

    \b
    Examples:
      qexport unpack model.qpk.safetensors
      qexport unpack model.qpk.safetensors -o model.qx.safetensors && qexport to-onnx model.qx.safetensors
    """
    from qexport.pack.packfile import unpack_file

    out = check_output_path(Path(output) if output else _beside(packed, ".unpacked.qx.safetensors"), [packed])
    digest = unpack_file(packed, out)
    click.echo(f"wrote {out}  (sha256 {digest[:12]})")


@click.command("to-c")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Folder for the C sources (created if missing; default: MODEL's name with -c).")
@click.option("--data", "data_name", default=None,
              help="Calibration data for the activation ranges: dataset name or .npz path (default: the artifact's dataset).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with DIR/<dataset>/ (default: $QEXPORT_DATA, else ./data).")
@click.option("--seed", type=SEED, default=None, help="Split seed (default: the artifact's).")
@click.option("--calibration", type=click.Choice(["minmax", "percentile"]), default="minmax", show_default=True,
              help="Activation range estimate, as for `to-onnx`'s integer forms.")
@click.option("--float-mlp", is_flag=True,
              help="The float-accumulating C of an MLP instead (no calibration; float activations, needs an FPU).")
def to_c(model, output, data_name, data_dir, seed, calibration, float_mlp):
    """Export an artifact as integer C99 sources for a microcontroller (C99, libm's rintf/fmaf only).

    The C computes what the QOperator ONNX file computes, output for output: uint8 activations in one
    static arena planned by liveness, weight codes kept packed at N bits in flash and read by the
    kernels, int32 accumulation, onnxruntime's requantization. Takes conv (also depthwise/grouped),
    linear, BatchNorm and ReLU/ReLU6 folded, max pool, global average pool, add, flatten, reshape;
    other ops are refused by name. Prints the flash and RAM it needs; `qexport verify FOLDER`
    builds it here and compares it with onnxruntime.

    \b
    Examples:
      qexport to-c resnet20-2b.qx.safetensors -o r20_c/
      qexport verify r20_c/ --artifact resnet20-2b.qx.safetensors
      cc -std=c99 -O2 -ffp-contract=off r20_c/*.c -lm -o qmodel && ./qmodel inputs.txt
      qexport to-c digits-2b.qpk.safetensors --float-mlp -o digits-c/   # float MLP C (earlier format)
    """
    out = Path(output) if output else _beside(model, "-c")
    if float_mlp:
        from qexport.pack.c_export import export_c
        from qexport.pack.packfile import load_packed

        packed = load_packed(model)
        paths = export_c(packed, out, [model])
        s = packed.sizes()
        click.echo(f"wrote {', '.join(p.name for p in paths)} to {out}/")
        click.echo(f"  weights in flash: {s['payload']} B packed codes + {s['scales'] + s['floats']} B float scales/biases/normalisation")
        click.echo(f"  check on this machine: cc -std=c99 -O2 {out}/qmodel.c {out}/qmodel_main.c -o qmodel && ./qmodel inputs.txt")
        return
    from qadmm.errors import UserError
    from qexport.api import to_c as export
    from qexport.artifact import load_artifact
    from qexport.cli.onnx import _dataset

    if model.endswith(".qpk.safetensors"):
        raise UserError(f"{model} is a packed file: integer C needs the artifact (`qexport unpack {model}` restores it), "
                        "or use --float-mlp for an MLP's float C")
    from qexport.pack.c_export import check_folder
    from qexport.pack.c_integer import FILES

    check_folder(out, FILES, [model])  # before the calibration
    art = load_artifact(model)
    data = _dataset(art, data_name, data_dir, seed)
    cm = export(art, None, data, calibration, progress=True)
    from qexport.pack.c_export import write_sources

    paths = write_sources(cm.files, out, [model])
    click.echo(f"wrote {', '.join(p.name for p in paths)} to {out}/")
    click.echo(f"  flash: {cm.flash['codes']} B packed weight codes + {cm.flash['constants']} B per-channel constants "
               f"(+ code); RAM: {cm.arena} B ({cm.manifest['arena_bytes']} B activation arena, "
               f"{cm.manifest['row_bytes']} B for one unpacked row of codes)")
    click.echo(f"  check it: qexport verify {out} --artifact {model}")
