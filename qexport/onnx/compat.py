"""Which onnxruntime loads a file: the oldest release that implements the file's opset and IR
version and every kernel it uses, and how much older a runtime `--opset` would reach.

onnxruntime refuses a file whose IR version or default-domain opset is newer than the ONNX
release it was built with ("Unsupported model IR version: 10, max supported IR version: 9";
"ValidateOpsetForDomain"), and a tensor type or kernel it lacks ("Could not find an
implementation for Cast(21)"). The first two follow from the table below; what qexport writes that
came later than its opset is listed in `LATE`.
"""
from __future__ import annotations

from dataclasses import dataclass

# onnxruntime release -> the newest ai.onnx opset and IR version it implements.
# 1.6-1.20: onnxruntime's published table, "ONNX Runtime compatibility", ONNX opset support,
#   https://onnxruntime.ai/docs/reference/compatibility.html (docs/reference/compatibility.md of
#   microsoft/onnxruntime's gh-pages branch), columns "ONNX opset version" and "ONNX IR version".
# 1.21-1.25: that table stops at 1.20. These rows are the ONNX release each one integrates, with
#   ONNX's own opset and IR numbers (onnx.helper.VERSION_TABLE): 1.21 and 1.22 use ONNX 1.17
#   (opset 22, IR 10; microsoft/onnxruntime#23162), 1.23 uses ONNX 1.18 (opset 23, IR 11;
#   microsoft/onnxruntime#24945), 1.24 uses ONNX 1.20 (opset 25, IR 13; its ONNX submodule is
#   1.20.1, microsoft/onnxruntime#27326), 1.25 uses ONNX 1.21 (opset 26, IR 13; measured only).
#   Each row from 1.15 on was checked by loading one-node models at every opset 13-26
#   and IR 7-13 in that release's PyPI wheel (docs/onnx.md, "Older onnxruntime"). Where the
#   measurement is more permissive than the table (1.15 loads IR 9), the table's value is kept;
#   where it is stricter, the measurement: the table gives 1.15 opset 19, but 1.15.1 has no
#   Identity(19) kernel ("Could not find an implementation for Identity(19)"), so 18 here.
RELEASES: tuple[tuple[str, int, int], ...] = (
    ("1.6", 13, 7), ("1.7", 13, 7), ("1.8", 14, 7), ("1.9", 15, 8), ("1.10", 15, 8), ("1.11", 16, 8),
    ("1.12", 17, 8), ("1.13", 17, 8), ("1.14", 18, 8), ("1.15", 18, 8), ("1.16", 19, 9), ("1.17", 20, 9),
    ("1.18", 21, 10), ("1.19", 21, 10), ("1.20", 21, 10), ("1.21", 22, 10), ("1.22", 22, 10),
    ("1.23", 23, 11), ("1.24", 25, 13), ("1.25", 26, 13),
)

# What qexport writes that onnxruntime supported later than the opset defining it:
# (op reading it, or None for any tensor of the type; ONNX type) -> (release, what).
# INT4 tensors (the `weights` form's 3-4 bit codes, and 1-2 bit codes below opset 25): opset 21
# defines them, but 1.18 refuses any ("MLDataType for: tensor(int4) is not currently registered";
# CPU support came with microsoft/onnxruntime#20362, in 1.19). Cast from INT4 (the default
# `--dequant cast`) came in 1.23 (microsoft/onnxruntime#24973): 1.18 refuses the file with "tensor
# type 22 is not supported", 1.19-1.22 with "Could not find an implementation for Cast(21)".
# Both measured (docs/onnx.md, "Older onnxruntime").
LATE: dict[tuple[str | None, str], tuple[str, str]] = {
    (None, "INT4"): ("1.19", "INT4 tensors"),
    ("Cast", "INT4"): ("1.23", "Cast from INT4"),
}

# com.microsoft operators (QGemm, QLinearAdd, QLinearGlobalAveragePool in `qoperator` files) are
# onnxruntime's own and not in the table; the oldest release checked with them is 1.15 (the oldest
# wheel PyPI has for the Python qexport needs), so no older one is claimed.
CONTRIB_CHECKED_FROM = "1.15"


def release_key(release: str) -> tuple[int, ...]:
    """Release "1.17.3" as (1, 17, 3), to compare releases."""
    return tuple(int(p) for p in release.split("."))


def oldest_onnxruntime(opset: int, ir_version: int) -> str | None:
    """The oldest onnxruntime release implementing ai.onnx `opset` and IR `ir_version` (the
    table above); None when no release in the table does."""
    for release, max_opset, max_ir in RELEASES:
        if opset <= max_opset and ir_version <= max_ir:
            return release
    return None


@dataclass(frozen=True)
class Requirement:
    """What onnxruntime a file needs, and what the lowest opset qexport can write it at would need."""

    opset: int
    ir_version: int
    onnxruntime: str | None  # oldest release that loads the file (None: newer than every known release)
    reasons: tuple[str, ...]  # what besides the opset/IR raises it (a late kernel, contrib operators)
    lowest_opset: int  # the lowest `--opset` this graph can be written at
    lowest_onnxruntime: str | None  # what the file written at `lowest_opset` would need

    def describe(self) -> str:
        """One line: `loads in onnxruntime >= 1.18 (opset 21, IR 10); for an older runtime use --opset 13`."""
        why = "; ".join((f"opset {self.opset}, IR {self.ir_version}", *self.reasons))
        if self.onnxruntime is None:
            newest = RELEASES[-1]
            return (f"needs an onnxruntime newer than {newest[0]} (opset {self.opset}, IR {self.ir_version}; "
                    f"{newest[0]} implements opset {newest[1]}, IR {newest[2]})")
        line = f"loads in onnxruntime >= {self.onnxruntime} ({why})"
        if self.lowers():
            line += f"; for an older runtime use --opset {self.lowest_opset} (onnxruntime >= {self.lowest_onnxruntime})"
        return line

    def lowers(self) -> bool:
        """Whether writing the graph at `lowest_opset` would load in an older onnxruntime."""
        if self.lowest_onnxruntime is None or self.lowest_opset >= self.opset:
            return False
        return self.onnxruntime is None or release_key(self.lowest_onnxruntime) < release_key(self.onnxruntime)


def _ir_for(opset: int, contrib: bool) -> int:
    """The IR version qexport stamps on a file of this opset (`builder.finish`)."""
    from onnx import helper

    ids = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    return helper.find_min_ir_version_for(ids, ignore_unknown=True)


def _needs(opset: int, ir_version: int, floors: list[tuple[str, str]]) -> tuple[str | None, tuple[str, ...]]:
    """The table's release for (opset, IR), raised to the highest of `floors` ((release, why));
    the reasons are the floors that set it."""
    table = oldest_onnxruntime(opset, ir_version)
    if table is None or not floors:
        return table, ()
    top = max((release for release, _ in floors), key=release_key)
    if release_key(top) <= release_key(table):
        return table, ()
    return top, tuple(why for release, why in floors if release == top)


def _type_at(dtype: str, opset: int) -> str:
    """The type the builder stores codes of ONNX type `dtype` in at `opset`: the narrowest of
    `builder.INT_TYPES` from `dtype` on that the opset allows (`builder.narrowest_type`)."""
    from qexport.ops.emit import INT_TYPES

    names = [name for name, *_ in INT_TYPES]
    if dtype not in names:
        return dtype
    return next((name for name, _, _, o in INT_TYPES[names.index(dtype):] if o <= opset), dtype)


def requirement(model, lowest_opset: int | None = None) -> Requirement:
    """The onnxruntime a ModelProto written by qexport needs (from its opset, IR version and
    nodes), and what the same graph written at its lowest opset would need (`lowest_opset`,
    default: the `qexport.min_opset` metadata `builder.finish` writes, else the file's opset)."""
    from onnx import TensorProto

    from qexport.ops.emit import MIN_OPSET

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
    contrib = any(o.domain == "com.microsoft" for o in model.opset_import)
    if lowest_opset is None:
        value = {p.key: p.value for p in model.metadata_props}.get("qexport.min_opset", "")
        lowest_opset = int(value) if value.isdigit() else opset
    lowest = min(lowest_opset, opset)
    types = {t.name: TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    uses = {(None, t) for t in types.values()} | {(n.op_type, types[i]) for n in model.graph.node for i in n.input if i in types}

    def floors(at: int) -> list[tuple[str, str]]:
        """Releases that what the graph written at opset `at` uses need, with why."""
        late = {LATE[k] for op, t in uses if (k := (op, _type_at(t, at))) in LATE}
        out = sorted((release, f"{what} since {release}") for release, what in late)
        if contrib:
            out.append((CONTRIB_CHECKED_FROM, f"com.microsoft operators, checked from {CONTRIB_CHECKED_FROM}"))
        return out

    release, reasons = _needs(opset, model.ir_version, floors(opset))
    low_release, _ = _needs(lowest, _ir_for(lowest, contrib), floors(lowest))
    return Requirement(opset, model.ir_version, release, reasons, lowest, low_release)
