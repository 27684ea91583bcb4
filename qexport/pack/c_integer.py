"""`qexport to-c`: the integer (QOperator) graph as C99 for a microcontroller.

The C computes what the QOperator ONNX file and `verify`'s integer reference compute, value for
value: uint8 activations, N-bit weight codes read from the packed bytes (the `.qpk` payloads, byte
for byte) as the kernels need them, int32 accumulation, onnxruntime's requantization in fp32. Each
op kind emits its own call (`Kind.c` in `qexport/ops/`); a kind without one is refused by name.

Activations live in one static arena, planned by liveness: each value gets the lowest offset that
does not overlap a value alive at the same time (an op's output never overlaps its inputs), so a
chain ping-pongs between two buffers and a residual branch holds its memory only while needed.
Flatten/Reshape share their input's bytes. Files written:

- `qmodel.h`: `int qmodel_predict(const float *input, float *logits)` and the sizes;
- `qmodel.c`: generated; the packed codes, per-channel constants, the arena and the op calls;
- `qint.h`, `qint.c`: the kernels (fixed sources);
- `qmodel_main.c`: a desktop driver (samples as text in, class and outputs out);
- `qmodel.json`: what `verify` needs to check the folder: the artifact's hash, the calibration and
  every value's scale and zero point.
"""
from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from qadmm.errors import UserError
from qexport.ops.integer import QParams
from qexport.ops import KINDS
from qexport.ops.base import INPUT, OUTPUT, Op
from qexport.pack.bitpack import SIGN

TEMPLATES = ("qint.h", "qint.c", "qmodel_main.c")
FILES = ("qmodel.h", "qmodel.c", "qmodel.json", *TEMPLATES)
# IEEE single precision, one rounding per operation except where the source calls fmaf
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off"]


def c_float(x: float) -> str:
    # %.9e round-trips every float32 exactly through a C compiler's decimal conversion
    return f"{float(np.float32(x)):.9e}f"


@dataclass
class CGen:
    """The C under construction: what an op kind's `c` method writes through."""

    qp: dict[str, QParams]
    layers: dict  # layer name -> LayerCodes
    packed: dict  # layer name -> PackedLayer (the payload bytes)
    shapes: dict[str, list[int]]
    offsets: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    decls: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    flash: dict[str, int] = field(default_factory=lambda: {"codes": 0, "constants": 0})
    row: int = 0  # the longest output channel's codes: the one unpacked row in RAM
    count: int = 0  # names given so far (`name`)

    def name(self, prefix: str) -> str:
        """A fresh C identifier."""
        self.count += 1
        return f"{prefix}{self.count - 1}"

    def root(self, v: str) -> str:
        return root(v, self.aliases)

    def ptr(self, v: str) -> str:
        return f"qm_arena + {self.offsets[self.root(v)]}u"

    @staticmethod
    def f32(x: float) -> str:
        return c_float(x)

    def size(self, v: str) -> int:
        return int(np.prod(self.shapes[v], dtype=np.int64))

    def array(self, ctype: str, name: str, values, codes: bool = False) -> str:
        """A static const array in flash; returns its name."""
        v = np.asarray(values).reshape(-1)
        if ctype == "float":
            items = [c_float(x) for x in v]
        elif ctype == "uint8_t":
            items = [f"0x{int(x):02x}" for x in v]
        else:
            items = [str(int(x)) for x in v]
        rows = [", ".join(items[i:i + 12]) for i in range(0, len(items), 12)]
        self.decls.append(f"static const {ctype} {name}[{len(v)}] = {{\n    " + ",\n    ".join(rows) + "\n};")
        self.flash["codes" if codes else "constants"] += v.size * {"float": 4, "uint8_t": 1, "int8_t": 1}.get(ctype, 4)
        return name

    def layer(self, op: Op, il, geometry: dict[str, int]) -> str:
        """A `qi_conv_t` for a quantized conv/linear: the packed codes, the sign of a folded
        BatchNorm, the int32 bias and the requantization multipliers (x_s·w_s)/y_s in fp32, computed
        as `qexport.ops.integer.qlinear` computes them. Returns the struct's name."""
        lay = self.packed[op.name]
        px, py = self.qp[op.inputs[0]], self.qp[op.out]
        cout = il.q.shape[0]
        m = (np.float32(px.scale) * np.broadcast_to(il.w_scale, (cout,)).astype(np.float32)) / np.float32(py.scale)
        k = self.name("")
        codes = self.array("uint8_t", f"qm_codes{k}", lay.data, codes=True)
        flip = self.array("int8_t", f"qm_flip{k}", il.sign)
        bias = self.array("int32_t", f"qm_bias{k}", il.bias)
        mult = self.array("float", f"qm_m{k}", m.astype(np.float32))
        per_out = int(np.prod(il.q.shape[1:], dtype=np.int64))
        self.row = max(self.row, per_out)
        g = {"cin": 1, "h": 1, "w": 1, "ho": 1, "wo": 1, "kh": 1, "kw": 1, "sh": 1, "sw": 1, "dh": 1, "dw": 1, "ph": 0,
             "pw": 0, "groups": 1, **geometry, "cout": cout}
        fields = ", ".join(f"{g[f]}u" for f in ("cin", "h", "w", "cout", "ho", "wo", "kh", "kw", "sh", "sw", "dh", "dw",
                                                 "ph", "pw", "groups"))
        enc = "QI_SIGN" if lay.encoding == SIGN else "QI_TWOS_COMPLEMENT"
        self.decls.append(f"static const qi_conv_t qm_layer{k} = {{ /* {op.name}: {lay.codes.describe().replace('±', '+/-')} */\n"
                          f"    {codes}, {lay.width}u, {enc}, {flip}, {bias}, {mult}, qm_row,\n"
                          f"    {fields}, {int(px.zero_point)}u, {int(py.zero_point)}u}};")
        return f"qm_layer{k}"


def root(v: str, aliases: dict[str, str]) -> str:
    """The value whose bytes `v` shares (itself unless a Flatten/Reshape made it)."""
    while v in aliases:
        v = aliases[v]
    return v


def plan_arena(ops: list[Op], values: list[str], sizes: dict[str, int], aliases: dict[str, str]) -> tuple[dict[str, int], int]:
    """Offsets for the values (aliases resolved to their root) and the arena's size: greedy by size,
    each at the lowest offset free of every value whose lifetime (first write to last read, in op
    order) meets its own."""
    born = {INPUT: -1}
    last: dict[str, int] = {}
    for k, op in enumerate(ops):
        born.setdefault(root(op.out, aliases), k)
        for i in op.inputs:
            last[root(i, aliases)] = k
    last[root(OUTPUT, aliases)] = len(ops)
    roots = [v for v in values if v not in aliases]
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, born, last)
    offsets: dict[str, int] = {}
    for v in sorted(roots, key=lambda v: (-sizes[v], born.get(v, -1))):
        b, e = born.get(v, -1), last.get(v, born.get(v, -1))
        busy = sorted((o, end) for o, end, pb, pe in placed if pb <= e and b <= pe)
        off = 0
        for o, end in busy:
            if off + sizes[v] <= o:
                break
            off = max(off, end)
        offsets[v] = off
        placed.append((off, off + sizes[v], b, e))
    return offsets, max((end for _, end, _, _ in placed), default=0)


@dataclass
class CModel:
    files: dict[str, str]
    flash: dict[str, int]  # codes, constants (bytes)
    arena: int  # bytes of RAM: the activation arena and the one unpacked row
    manifest: dict


def integer_c(art, packed, qp: dict[str, QParams], calib: dict) -> CModel:
    """The C sources of `art`'s integer graph under the activation parameters `qp`; `packed` gives
    the codes' payload bytes. A UserError names every op without a C kernel."""
    from qexport.graph import fuse
    from qexport.onnx.integer_graph import check_int8, reads_input

    check_int8(art)
    ops = fuse(art.graph, split_silu=False)  # (a SiLU has no C kernel, whole or split: refused by its own name)
    cg = _emit(art, packed, qp, ops, skip_float_input=False)
    # values: the quantized input (if an op reads it) and every op's output
    values = ([INPUT] if reads_input(ops) else []) + [op.out for op in ops]
    sizes = {v: cg.size(v) for v in values}
    cg.offsets, arena = plan_arena(ops, values, sizes, cg.aliases)
    # the first call: the input's QuantizeLinear (a normalisation folded into it writes its own value)
    n_in = int(np.prod(art.graph.input_shape))
    head = []
    if INPUT in cg.offsets:
        p = qp[INPUT]
        head.append(f"qi_quantize({n_in}u, input, {c_float(p.scale)}, {int(p.zero_point)}u, {cg.ptr(INPUT)});")
    body = [_resolve(c, cg) for c in cg.calls]
    po = qp[OUTPUT]
    n_out = cg.size(OUTPUT)
    code_sets = ", ".join(sorted({lc.codes.describe().replace("±", "+/-") for lc in art.layers.values()}))
    banner = (f"/* Generated by `qexport to-c` from artifact {art.sha256[:16]} ({art.meta.get('method', {}).get('name', '?')}, "
              f"{code_sets}). Do not edit. */")
    header = "\n".join([
        banner, "#ifndef QMODEL_H", "#define QMODEL_H", "",
        f"#define QMODEL_INPUTS {n_in} /* input shape {tuple(art.graph.input_shape)}, C order, raw (unnormalised) values */",
        f"#define QMODEL_CLASSES {n_out} /* outputs (shape {tuple(cg.shapes[OUTPUT])}) */",
        f"#define QMODEL_ARENA_BYTES {arena} /* uint8 activations, planned by liveness */",
        f"#define QMODEL_ROW_BYTES {cg.row} /* one output channel's codes, unpacked while it is computed */",
        f'#define QMODEL_SOURCE_SHA256 "{art.sha256}"', "",
        "/* Run the model on one sample: QMODEL_INPUTS floats in, QMODEL_CLASSES floats out (the",
        " * dequantized uint8 output); returns the argmax (first on ties). One static arena: not reentrant. */",
        "int qmodel_predict(const float *input, float *logits);", "", "#endif /* QMODEL_H */", ""])
    source = "\n".join([
        banner, "#include <stdint.h>", "", '#include "qint.h"', '#include "qmodel.h"', "",
        f"static uint8_t qm_arena[{max(arena, 1)}];",
        f"static int8_t qm_row[{max(cg.row, 1)}]; /* one output channel's codes, unpacked */", "", *cg.decls, "",
        "int qmodel_predict(const float *input, float *logits)", "{", "    uint32_t i;", "    int best = 0;",
        *(f"    {c}" for c in head + body),
        f"    qi_dequantize({n_out}u, {cg.ptr(OUTPUT)}, {c_float(po.scale)}, {int(po.zero_point)}u, logits);",
        "    for (i = 1; i < QMODEL_CLASSES; ++i)", "        if (logits[i] > logits[best])", "            best = (int)i;",
        "    return best;", "}", ""])
    manifest = {"format": "qexport-c", "version": 1, "source_sha256": art.sha256, "calibration": calib,
                "qparams": {v: [float(p.scale).hex(), int(p.zero_point)] for v, p in qp.items()},
                "flash": cg.flash, "arena_bytes": arena, "row_bytes": cg.row}
    files = {"qmodel.h": header, "qmodel.c": source, "qmodel.json": json.dumps(manifest, indent=1) + "\n"}
    tdir = resources.files("qexport.pack") / "c_templates"
    for name in TEMPLATES:
        files[name] = (tdir / name).read_text()
    return CModel(files, dict(cg.flash), arena + cg.row, manifest)


def _emit(art, packed, qp: dict[str, QParams], ops: list[Op], skip_float_input: bool) -> CGen:
    """Every op's C through its kind; a UserError naming every op without a C kernel."""
    cg = CGen(qp, art.layers, {lay.name: lay for lay in packed.layers}, dict(art.graph.shapes))
    cg.shapes.setdefault(INPUT, list(art.graph.input_shape))
    missing = [op for op in ops if not (skip_float_input and KINDS[op.kind].float_input) and KINDS[op.kind].c(cg, op) is False]
    if missing:
        names = ", ".join(f"{op.name} ({op.kind}{'' if op.name in art.layers or op.kind not in ('conv', 'linear') else ', kept float'})"
                          for op in missing[:8])
        raise UserError(f"to-c has no integer C kernel for {len(missing)} op(s): {names}{', ...' if len(missing) > 8 else ''}; "
                        "to-c takes conv, linear (quantized), batchnorm and relu/relu6 folded into them, max pool, global "
                        "average pool, add, flatten, reshape and a scalar input normalisation: use `qexport to-onnx` for this model")
    return cg


def check_c(art, packed) -> None:
    """Refuse (UserError, naming them) a graph with ops that have no C kernel, before calibration:
    the kinds emit their C under placeholder activation parameters (the normalisation, whose C
    depends on the real ones, is checked by `integer_c`)."""
    from qexport.graph import fuse

    ops = fuse(art.graph, split_silu=False)
    qp = {v: QParams(np.float32(1.0), np.uint8(0)) for op in ops for v in [*op.inputs, op.out]}
    _emit(art, packed, qp, ops, skip_float_input=True)


def _resolve(call: str, cg: CGen) -> str:
    """A kind's call with `{value}` placeholders replaced by arena pointers."""
    return re.sub(r"\{([^{}]+)\}", lambda m: cg.ptr(m.group(1)) if m.group(1) in cg.offsets or m.group(1) in cg.aliases
                  else m.group(0), call)


def read_qparams(manifest: dict) -> dict[str, QParams]:
    return {v: QParams(np.float32(float.fromhex(s)), np.uint8(z)) for v, (s, z) in manifest["qparams"].items()}


def compiler() -> str | None:
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def build_host(folder: Path, out: Path) -> Path:
    """Compile the folder's sources with the host C compiler (warnings as errors)."""
    cc = compiler()
    if cc is None:
        raise UserError("no C compiler found (cc, gcc or clang): install one to build and check the C sources")
    srcs = [str(folder / n) for n in ("qint.c", "qmodel.c", "qmodel_main.c")]
    r = subprocess.run([cc, *CFLAGS, *srcs, "-o", str(out), "-lm"], capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"the C sources in {folder} do not compile with {cc}: {r.stderr.strip().splitlines()[0] if r.stderr else ''}")
    return out


def run_c(command: list[str], x: np.ndarray, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, outputs float32) of the C driver on samples x (one per row). `command`
    runs it; an item "{inputs}" is replaced by the inputs file's path (else it is appended)."""
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "inputs.txt"
        flat = np.asarray(x, np.float32).reshape(len(x), -1)
        np.savetxt(inp, flat, fmt="%.9e")
        cmd = [c.replace("{inputs}", str(inp)) for c in command]
        if cmd == command:
            cmd.append(str(inp))
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"the C program failed (exit {r.returncode}): {r.stderr.strip()[:200]}")
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()]
    if len(rows) != len(x) or any(len(row) != n_out + 1 for row in rows):
        raise UserError(f"the C program printed {len(rows)} lines for {len(x)} samples")
    pred = np.array([int(row[0]) for row in rows])
    out = np.array([[np.float32(float(v)) for v in row[1:]] for row in rows], np.float32)
    return pred, out


# A Cortex-M4 with its FPU (single precision), as QEMU's mps2-an386 board emulates it; newlib with
# semihosting (rdimon) gives the driver its command line, files and exit status.
ARM_GCC = "arm-none-eabi-gcc"
M4_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "--specs=rdimon.specs"]
QEMU = "qemu-system-arm"


def cortex_m4_tools() -> str | None:
    """None when the cross compiler and QEMU are installed, else what is missing (and how to get it)."""
    missing = [t for t in (ARM_GCC, QEMU) if shutil.which(t) is None]
    if missing:
        return (f"{' and '.join(missing)} not found: install them with "
                "`apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm`")
    return None


def build_cortex_m4(folder: Path, out: Path) -> dict[str, int]:
    """Cross-compile the folder's sources and the test harness (vector table, reset handler that
    enables the FPU, linker script of the board) for a Cortex-M4; returns the ELF's section sizes
    (text, data, bss) as arm-none-eabi-size gives them."""
    tdir = resources.files("qexport.pack") / "c_templates"
    with resources.as_file(tdir / "cortex_m4_startup.c") as start, resources.as_file(tdir / "cortex_m4_mps2_an386.ld") as ld:
        srcs = [str(start)] + [str(folder / n) for n in ("qint.c", "qmodel.c", "qmodel_main.c")]
        r = subprocess.run([ARM_GCC, *M4_FLAGS, *CFLAGS, "-T", str(ld), *srcs, "-lm", "-o", str(out)],
                           capture_output=True, text=True)
    if r.returncode != 0:
        over = re.search(r"region `(\w+)' overflowed by (\d+) bytes", r.stderr)
        if over:
            raise UserError(f"the model does not fit the Cortex-M4 board's 4 MiB of {'code memory' if over.group(1) == 'FLASH' else 'RAM'} "
                            f"(over by {over.group(2)} bytes): quantize to fewer bits, or verify on the host only")
        first = next((line for line in r.stderr.splitlines() if "error" in line), r.stderr.strip()[:200])
        raise UserError(f"the C sources in {folder} do not build for the Cortex-M4: {first.strip()}")
    size = subprocess.run(["arm-none-eabi-size", str(out)], capture_output=True, text=True)
    text, data, bss = (int(v) for v in size.stdout.splitlines()[1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


def qemu_command(elf: Path) -> list[str]:
    """QEMU running the Cortex-M4 build on the board, the inputs file passed by semihosting."""
    return [QEMU, "-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "none",
            "-semihosting-config", "enable=on,target=native,arg=qmodel,arg={inputs}", "-kernel", str(elf)]


def host() -> str:
    return f"{platform.machine()} {compiler() or 'no compiler'}"


def read_manifest(folder: Path) -> dict:
    p = Path(folder) / "qmodel.json"
    if not p.is_file():
        raise UserError(f"{folder} has no qmodel.json: give a folder written by `qexport to-c`")
    try:
        manifest = json.loads(p.read_text())
    except ValueError as e:
        raise UserError(f"{p} is not valid JSON ({e}): write the folder again with `qexport to-c`") from None
    need = ("source_sha256", "calibration", "qparams", "flash", "arena_bytes", "row_bytes")
    if manifest.get("format") != "qexport-c" or manifest.get("version") != 1 or any(k not in manifest for k in need):
        raise UserError(f"{p} is not a qexport C manifest of version 1: write the folder again with `qexport to-c`")
    return manifest


def verify_folder(folder: str | Path, art, x: np.ndarray, y: np.ndarray | None, cortex_m4: int = 0) -> dict:
    """Build the C in `folder` with the host compiler, run it on samples x and compare its outputs
    with the integer reference and with onnxruntime running the QOperator file of the same
    activation parameters: the report (`passed`: 0 differing outputs against both). With
    `cortex_m4` = N, also build it for a Cortex-M4 and run the first N samples in QEMU: their outputs
    must equal the host's."""
    import torch

    from qexport.graph import fuse
    from qexport.onnx.qoperator import export_qoperator
    from qexport.onnx.runner import faithful_config
    from qexport.onnx.verify import _run, integer_reference

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["source_sha256"] != art.sha256:
        raise UserError(f"{folder} was written from artifact {manifest['source_sha256'][:12]}, not from this one "
                        f"({art.sha256[:12]}): give the artifact it was exported from")
    qp = read_qparams(manifest)
    ops = fuse(art.graph)
    n_out = int(np.prod(art.graph.shapes[OUTPUT]))
    x = np.asarray(x, np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_host(folder, Path(tmp) / "qmodel")
        pred, out = run_c([str(exe)], x, n_out)
        m4 = None
        if cortex_m4:
            elf = Path(tmp) / "qmodel.elf"
            m4 = {"sizes": build_cortex_m4(folder, elf), "outputs": run_c(qemu_command(elf), x[:cortex_m4], n_out)[1]}
    ref = np.concatenate([integer_reference(art, ops, qp, torch.as_tensor(x[i:i + 256]), every_value=False)[OUTPUT].numpy()
                          for i in range(0, len(x), 256)]).reshape(len(x), -1)
    model = export_qoperator(art, ops, qp, manifest["calibration"])
    ort = _run(model, "all", faithful_config(model), x, 256)[OUTPUT].reshape(len(x), -1)
    runs = {"integer reference": ref, "onnxruntime qoperator": ort}
    rep = {"folder": str(folder), "artifact_sha256": art.sha256, "samples": len(x), "host": host(),
           "flash_bytes": manifest["flash"], "arena_bytes": manifest["arena_bytes"], "row_bytes": manifest["row_bytes"],
           "against": {}}
    for name, r in runs.items():
        rep["against"][name] = {"differing_outputs": int((r != out).any(1).sum()),
                                "max_abs": float(np.abs(r - out).max()) if len(x) else 0.0}
    if m4 is not None:
        r, host_out = m4["outputs"], out[:len(m4["outputs"])]
        rep["cortex_m4"] = {"samples": len(r), "sizes": m4["sizes"], "differing_outputs": int((r != host_out).any(1).sum())}
    rep["accuracy"] = None if y is None else float(100 * (pred == np.asarray(y)).mean())
    rep["passed"] = all(v["differing_outputs"] == 0 for v in [*rep["against"].values(), rep.get("cortex_m4", {})]
                        if v)
    return rep


def format_report(rep: dict) -> str:
    lines = [f"C sources {rep['folder']} (built here: {rep['host']}) vs artifact {rep['artifact_sha256'][:12]} on {rep['samples']} samples"]
    f = rep["flash_bytes"]
    lines.append(f"  flash: {f['codes']} B packed codes + {f['constants']} B constants; RAM: {rep['arena_bytes']} B activation "
                 f"arena + {rep['row_bytes']} B unpacked row")
    if rep["accuracy"] is not None:
        lines.append(f"  accuracy of the C build: {rep['accuracy']:.2f}%")
    for name, r in rep["against"].items():
        lines.append(f"  {'PASS' if r['differing_outputs'] == 0 else 'FAIL':5s} C (host) vs {name}: "
                     f"{r['differing_outputs']} differing outputs (max |Δ| {r['max_abs']:.3g})")
    m4 = rep.get("cortex_m4")
    if m4:
        s = m4["sizes"]
        lines.append(f"  {'PASS' if m4['differing_outputs'] == 0 else 'FAIL':5s} C (Cortex-M4 in QEMU, text {s['text']} B, data "
                     f"{s['data']} B, bss {s['bss']} B, with newlib's stdio) vs C (host): {m4['differing_outputs']} differing "
                     f"outputs on the first {m4['samples']} samples")
    lines.append("PASSED" if rep["passed"] else "FAILED")
    return "\n".join(lines)
