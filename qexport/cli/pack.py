"""`qexport pack`, `qexport unpack`, `qexport to-c`: bit-packed binaries and C99 sources."""
from __future__ import annotations

from pathlib import Path

import click

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
def to_c(model, output):
    """Export an MLP artifact or packed file as portable C99 sources (libc only).

    Writes qmodel_config.h and qmodel_weights.h (packed codes, scales, biases, normalisation),
    qmodel.h / qmodel.c (int qmodel_predict(const float *x, float *logits), unpacking codes on
    the fly) and qmodel_main.c (a desktop driver). Only MLPs (Flatten, Linear, ReLU) are
    supported; export other models with `qexport to-onnx`.

    \b
    Examples:
      qexport to-c digits-mlp-digits-ptq-2b.qx.safetensors -o digits-c/
      qexport to-c model.qpk.safetensors -o firmware/model/
      cc -std=c99 -O2 digits-c/qmodel.c digits-c/qmodel_main.c -o qmodel && ./qmodel inputs.txt
    """
    from qexport.pack.c_export import export_c
    from qexport.pack.packfile import load_packed

    out = Path(output) if output else _beside(model, "-c")
    packed = load_packed(model)
    paths = export_c(packed, out, [model])
    s = packed.sizes()
    click.echo(f"wrote {', '.join(p.name for p in paths)} to {out}/")
    click.echo(f"  weights in flash: {s['payload']} B packed codes + {s['scales'] + s['floats']} B float scales/biases/normalisation")
    click.echo(f"  check on this machine: cc -std=c99 -O2 {out}/qmodel.c {out}/qmodel_main.c -o qmodel && ./qmodel inputs.txt")
