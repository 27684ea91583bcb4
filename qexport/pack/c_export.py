"""`qexport to-c`: a packed MLP as portable C99 (libc only) for microcontrollers.

Emits, into one folder: ``qmodel_config.h`` (sizes), ``qmodel_weights.h`` (the packed codes,
scales, biases, normalisation and the layer table, generated), and the fixed sources from
``c_templates/``: ``qmodel.h`` (API), ``qmodel.c`` (inference, unpacks codes on the fly) and
``qmodel_main.c`` (a desktop driver reading samples from a file). The packed arrays are byte for
byte the payloads of the packed file (docs/packing.md).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from qadmm.errors import UserError
from qexport.pack.bitpack import SIGN
from qexport.fileio import atomic_path, check_output_path
from qexport.pack.packfile import Packed

TEMPLATES = ("qmodel.h", "qmodel.c", "qmodel_main.c")
GENERATED = ("qmodel_config.h", "qmodel_weights.h")


def mlp_layers(model: nn.Module) -> tuple[nn.Module | None, list[tuple[str, nn.Linear, bool]]]:
    """(normalisation or None, [(name, Linear, ReLU after it)]) of an MLP read from the model's
    graph: [normalize], flatten/reshape/dropout, then Linear layers each with at most one ReLU
    after it, the last giving the logits; a UserError naming the first op that does not fit."""
    graph = getattr(model, "graph", None)
    if graph is None:
        raise UserError("to-c needs a model with a stored graph: re-create the file with this qexport")
    norm, layers = None, []
    for i, op in enumerate(graph.ops):
        if op.kind == "normalize" and i == 0:
            norm = op.module
        elif op.kind in ("flatten", "reshape") and not layers:
            continue
        elif op.kind == "linear":
            layers.append((op.name, op.module, False))
        elif op.kind == "relu" and layers and not layers[-1][2]:
            layers[-1] = (layers[-1][0], layers[-1][1], True)
        else:
            raise UserError(f"to-c exports MLPs only ([normalize], flatten, Linear, ReLU); {op.name} is {op.kind}: "
                            "use `qexport to-onnx` for this model")
    if not layers:
        raise UserError("to-c exports MLPs: this model has no Linear layer; use `qexport to-onnx`")
    if layers[-1][2]:
        raise UserError("to-c expects the last Linear to give the logits (no ReLU after it)")
    return norm, layers


def _floats(values: np.ndarray, name: str) -> str:
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise UserError(f"{name} holds NaN or infinite values: cannot export it to C")
    # %.9e round-trips every float32 exactly through a C compiler's decimal conversion
    items = [f"{float(x):.9e}f" for x in v]
    rows = [", ".join(items[i:i + 6]) for i in range(0, len(items), 6)]
    return "{\n    " + ",\n    ".join(rows) + "\n}"


def _bytes(data: np.ndarray) -> str:
    items = [f"0x{int(b):02x}" for b in data.reshape(-1)]
    rows = [", ".join(items[i:i + 16]) for i in range(0, len(items), 16)]
    return "{\n    " + ",\n    ".join(rows) + "\n}"


def _norm_index(mean_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(SIZE, DIV) with flat input i using statistic (i / DIV) % SIZE, when the statistics broadcast
    over leading and trailing input dims only (per-tensor, per-channel, per-feature); else None."""
    shape = (1,) * (len(input_shape) - len(mean_shape)) + tuple(mean_shape)
    nz = [d for d, s in enumerate(shape) if s != 1]
    if not nz:
        return 1, 1
    lo, hi = nz[0], nz[-1] + 1
    if any(shape[d] != input_shape[d] for d in range(lo, hi)):
        return None
    return int(np.prod(shape[lo:hi])), int(np.prod(input_shape[hi:], dtype=np.int64))


def c_sources(packed: Packed) -> dict[str, str]:
    """File name -> text of every file `to-c` writes (nothing is written here)."""
    model, _ = packed.model()
    norm, mlp = mlp_layers(model)
    input_shape = tuple(int(s) for s in packed.architecture["input_shape"])
    n_in = int(np.prod(input_shape))
    if mlp[0][1].in_features != n_in:
        raise UserError(f"the first Linear takes {mlp[0][1].in_features} features but the input has {n_in}")
    by_name = {lay.name: lay for lay in packed.layers}
    mean = norm.mean.detach().numpy() if norm is not None else np.zeros(1, np.float32)
    std = norm.std.detach().numpy() if norm is not None else np.ones(1, np.float32)
    idx = _norm_index(mean.shape, input_shape)
    if idx is None:  # an unusual broadcast: store the statistics per input feature
        mean, std = (np.broadcast_to(a, input_shape).copy() for a in (mean, std))
        idx = (n_in, 1)
    else:
        mean, std = mean.reshape(-1), std.reshape(-1)
    prov = packed.provenance
    code_sets = ", ".join(sorted({f"{lay.codes.scheme} {lay.codes.bits}-bit" for lay in packed.layers})) or "all layers float"
    title = (f"{packed.architecture.get('model')} from artifact {packed.source_sha256[:16]}, "
             f"method {prov.get('method', {}).get('name', '?')}, {code_sets}")
    banner = f"/* Generated by `qexport to-c`: {title}. Do not edit. */\n"
    cfg = [banner, "#ifndef QMODEL_CONFIG_H", "#define QMODEL_CONFIG_H", "",
           f"#define QMODEL_INPUTS {n_in} /* input shape {input_shape}, C order */",
           f"#define QMODEL_CLASSES {mlp[-1][1].out_features}",
           f"#define QMODEL_LAYERS {len(mlp)}",
           f"#define QMODEL_MAX_WIDTH {max([n_in] + [lin.out_features for _, lin, _ in mlp])}",
           f"#define QMODEL_NORM_SIZE {idx[0]} /* input i uses qm_mean/qm_std[(i / QMODEL_NORM_DIV) % QMODEL_NORM_SIZE] */",
           f"#define QMODEL_NORM_DIV {idx[1]}",
           f'#define QMODEL_SOURCE_SHA256 "{packed.source_sha256}"', "", "#endif /* QMODEL_CONFIG_H */", ""]
    w = [banner, "/* Included by qmodel.c only: these static arrays live in flash (.rodata). */",
         "#ifndef QMODEL_WEIGHTS_H", "#define QMODEL_WEIGHTS_H", "",
         "/* input normalisation x' = (x - mean) / std, fitted on the training split */",
         f"static const float qm_mean[{idx[0]}] = {_floats(mean, 'mean')};",
         f"static const float qm_std[{idx[0]}] = {_floats(std, 'std')};", ""]
    table = []
    for k, (name, lin, relu) in enumerate(mlp):
        lay = by_name.get(name)
        if lay is None:  # a layer kept float (--keep-first / --keep-last)
            w.append(f"/* {name}: float weights {tuple(lin.weight.shape)} */")
            w.append(f"static const float qm_w{k}[{lin.weight.numel()}] = {_floats(lin.weight.detach().numpy(), f'{name}.weight')};")
            fields = f"0u, QM_TWOS_COMPLEMENT, 0, NULL, NULL, qm_w{k}"
        else:
            w.append(f"/* {name}: {lay.codes.describe().replace('±', '+/-')}, shape {lay.shape}, {lay.width} bits per code, "
                     f"{lay.encoding}, {lay.data.size} bytes */")
            w.append(f"static const uint8_t qm_w{k}[{lay.data.size}] = {_bytes(lay.data)};")
            w.append(f"static const float qm_s{k}[{lay.scale.size}] = {_floats(lay.scale, f'{name} scale')};")
            enc = "QM_SIGN" if lay.encoding == SIGN else "QM_TWOS_COMPLEMENT"
            fields = f"{lay.width}u, {enc}, {int(lay.axis == 0)}, qm_w{k}, qm_s{k}, NULL"
        bias = "NULL"
        if lin.bias is not None:
            w.append(f"static const float qm_b{k}[{lin.out_features}] = {_floats(lin.bias.detach().numpy(), f'{name}.bias')};")
            bias = f"qm_b{k}"
        table.append(f"    {{{lin.in_features}u, {lin.out_features}u, {fields}, {bias}, {int(relu)}}}, /* {name} */")
        w.append("")
    w += ["static const qm_layer qm_layers[QMODEL_LAYERS] = {", *table, "};", "", "#endif /* QMODEL_WEIGHTS_H */", ""]
    files = {"qmodel_config.h": "\n".join(cfg), "qmodel_weights.h": "\n".join(w)}
    tdir = resources.files("qexport.pack") / "c_templates"
    for name in TEMPLATES:
        files[name] = (tdir / name).read_text()
    return files


def export_c(packed: Packed, outdir: str | Path, inputs: Sequence[str | Path] = ()) -> list[Path]:
    """Write the float MLP's C sources into `outdir` (see `write_sources`); returns their paths."""
    return write_sources(c_sources(packed), outdir, inputs)


def write_sources(files: dict[str, str], outdir: str | Path, inputs: Sequence[str | Path] = ()) -> list[Path]:
    """Write `files` (name -> text) into `outdir` (created if its parent exists); returns their paths.
    Every path is checked (none may be one of `inputs`) before the first file is written, and each
    file is written atomically."""
    out = check_folder(outdir, list(files), inputs)
    out.mkdir(exist_ok=True)
    paths = []
    for name, text in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
        paths.append(out / name)
    return paths


def check_folder(outdir: str | Path, names: Sequence[str], inputs: Sequence[str | Path] = ()) -> Path:
    """The folder the C sources `names` may be written to (a UserError if not: a file, a missing
    parent, or a name that is one of `inputs`)."""
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give a folder for the C sources")
    if not out.parent.is_dir():
        raise UserError(f"folder {out.parent} does not exist: create it first or choose another -o folder")
    if out.is_dir():
        for name in names:
            check_output_path(out / name, inputs)
    return out
