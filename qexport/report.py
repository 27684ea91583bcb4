"""Sweep reports: read a sweep's JSONL results, aggregate them over seeds, set them beside a
reference (the thesis's tables by default) and write report.md, figures/*.png and report.html.

Everything written is a function of the results alone (sorted, no timestamps, PNGs without the
matplotlib version), so the same results give byte-identical files.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from qadmm.errors import BadData, BadValue, OutputConflict, UserError
from qexport.fileio import PathLike, _same, atomic_path, check_output_path, read_bytes

SCHEMA = "qexport.sweep/1"
DASH = "—"


# ---------------------------------------------------------------- results


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise BadData(f"{where}: {what}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_record(rec: Any, where: str) -> None:
    """Refuse a line that is not a result of this schema, naming the first field that is wrong.
    Only the fields the report reads are checked; extra keys are ignored (newer sweeps add some)."""
    _need(isinstance(rec, dict), where, f"not a JSON object but {type(rec).__name__}")
    _need(rec.get("schema") == SCHEMA, where, f"schema is {rec.get('schema')!r}, expected {SCHEMA!r} "
          "(is this the JSONL file a qexport sweep writes?)")
    _need(isinstance(rec.get("key"), str) and rec["key"] != "", where, "'key' must be a non-empty string")
    cell = rec.get("cell")
    _need(isinstance(cell, dict), where, "'cell' must be a JSON object")
    for name in ("dataset", "model", "method"):
        _need(isinstance(cell.get(name), str) and cell[name] != "", where, f"cell.{name} must be a non-empty string")
    _need(_integer(cell.get("bits")) and cell["bits"] >= 1, where, f"cell.bits must be a positive integer, got {cell.get('bits')!r}")
    _need(_integer(cell.get("seed")), where, f"cell.seed must be an integer, got {cell.get('seed')!r}")
    _need(isinstance(cell.get("per_channel", False), bool), where, "cell.per_channel must be true or false")
    _need(isinstance(cell.get("params", {}), dict), where, "cell.params must be a JSON object")
    _need(isinstance(cell.get("spec", {}), dict), where, "cell.spec must be a JSON object")
    status = rec.get("status")
    _need(status in ("ok", "error"), where, f"status must be 'ok' or 'error', got {status!r}")
    if status == "error":
        _need(rec.get("error") is None or isinstance(rec["error"], str), where, "'error' must be a string or null")
        return
    _need(isinstance(rec.get("scheme"), str) and rec["scheme"] != "", where, "an ok cell needs 'scheme' (a string)")
    for name in ("acc", "float_acc"):
        _need(_number(rec.get(name)), where, f"an ok cell needs '{name}' (a finite number), got {rec.get(name)!r}")
    verify = rec.get("verify")
    _need(verify is None or (isinstance(verify, dict) and isinstance(verify.get("passed"), bool)), where,
          "'verify' must be null or an object with 'passed' true/false")
    for group, names in (("sizes", ("model_bytes", "float_bytes")), ("seconds", ("total",))):
        block = rec.get(group)
        _need(block is None or isinstance(block, dict), where, f"'{group}' must be an object")
        for name in names:
            v = (block or {}).get(name)
            _need(v is None or (_number(v) and v >= 0), where, f"{group}.{name} must be a non-negative number or null, got {v!r}")


def load_results(*paths: PathLike) -> list[dict]:
    """The results of sweeps' JSONL files (read as one, in order), one dict per cell, failed cells
    included (status "error"). A key that appears more than once (a cell rerun) keeps its last line.
    Raises `BadData` naming the file and line of the first malformed line."""
    by_key: dict[str, dict] = {}
    for path in paths:
        raw = read_bytes(path)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadData(f"{path} is not UTF-8 text (byte {e.start}): is it a sweep's results .jsonl file?") from None
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            raise BadData(f"{path} has no results (no non-empty lines): run the sweep first")
        for n, line in lines:
            where = f"{path} line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                # a sweep killed mid-write leaves a truncated last line: say how to go on
                raise BadData(f"{where}: not valid JSON ({e.msg} at column {e.colno}); delete or fix the line "
                              "(a sweep that was killed can leave its last line unfinished)") from None
            _check_record(rec, where)
            by_key.pop(rec["key"], None)  # the rerun takes the place of the first run in the order
            by_key[rec["key"]] = rec
    return list(by_key.values())


def split_results(results: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """(ok cells, failed cells)."""
    results = list(results)
    return [r for r in results if r["status"] == "ok"], [r for r in results if r["status"] != "ok"]


# ---------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Row:
    """One method at one bit width on one dataset and model, over its seeds."""

    dataset: str
    model: str
    method: str
    scheme: str
    per_channel: bool
    bits: int
    variant: str  # the hyperparameter overrides, "" for the defaults: different settings are not averaged together
    accs: tuple[float, ...]  # per cell, in seed order
    float_mean: float
    model_bytes: float | None
    float_bytes: float | None
    seconds: float | None
    verified: int  # cells whose ONNX verification passed
    verify_total: int  # cells that were verified

    @property
    def n(self) -> int:
        return len(self.accs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (0 for one seed)."""
        return statistics.stdev(self.accs) if len(self.accs) > 1 else 0.0

    @property
    def label(self) -> str:
        return self.method + (f" [{self.variant}]" if self.variant else "")

    @property
    def code_set(self) -> str:
        return self.scheme + (", per-channel" if self.per_channel else "")


def _variant(params: dict) -> str:
    return " ".join(f"{k}={json.dumps(params[k], sort_keys=True)}" for k in sorted(params))


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def aggregate(results: Iterable[dict]) -> list[Row]:
    """The ok cells grouped by (dataset, model, method, scheme, per_channel, bits) and their
    hyperparameter overrides, sorted by dataset, model, bits, method."""
    groups: dict[tuple, list[dict]] = {}
    for r in split_results(results)[0]:
        c = r["cell"]
        key = (c["dataset"], c["model"], c["method"], r["scheme"], c.get("per_channel", False), c["bits"],
               _variant({**(c.get("params") or {}), **(c.get("spec") or {})}))  # a [spec] axis is a variant too
        groups.setdefault(key, []).append(r)
    rows = []
    for key, recs in groups.items():
        # one result per seed (the last in the file): cells that differ only in what they export
        # (or a second sweep into the same file) quantized the same thing
        recs = sorted({r["cell"]["seed"]: r for r in recs}.values(), key=lambda r: r["cell"]["seed"])
        sizes = [r.get("sizes") or {} for r in recs]
        verify = [r["verify"] for r in recs if r.get("verify")]
        rows.append(Row(*key, accs=tuple(float(r["acc"]) for r in recs),
                        float_mean=statistics.fmean(float(r["float_acc"]) for r in recs),
                        model_bytes=_mean([s.get("model_bytes") for s in sizes]),
                        float_bytes=_mean([s.get("float_bytes") for s in sizes]),
                        seconds=_mean([(r.get("seconds") or {}).get("total") for r in recs]),
                        verified=sum(v["passed"] for v in verify), verify_total=len(verify)))
    return sorted(rows, key=lambda w: (w.dataset, w.model, w.bits, w.method, w.scheme, w.per_channel, w.variant))


def best_per_bits(rows: Iterable[Row]) -> dict[tuple[str, str], dict[int, Row]]:
    """For each (dataset, model) and bit width, the row with the highest mean accuracy (ties: the
    first in sort order)."""
    out: dict[tuple[str, str], dict[int, Row]] = {}
    for row in rows:
        best = out.setdefault((row.dataset, row.model), {})
        if row.bits not in best or row.mean > best[row.bits].mean:
            best[row.bits] = row
    return out


# ---------------------------------------------------------------- reference


@dataclass(frozen=True)
class RefRow:
    dataset: str
    method: str
    scheme: str
    bits: int
    mean: float
    std: float
    label: str


@dataclass(frozen=True)
class Reference:
    """Published accuracies to compare with, matched to a row by (dataset, method, scheme, bits)."""

    name: str
    source: str
    metric: str
    note: str
    rows: tuple[RefRow, ...]
    float_acc: dict[str, tuple[float, float]] = field(default_factory=dict)  # the file's "float"

    def match(self, row: Row) -> RefRow | None:
        # the scheme must agree: the thesis's N-bit numbers are for its own code set (scheme
        # "thesis"), not for symmetric or binary codes at the same N
        for ref in self.rows:
            if (ref.dataset, ref.method, ref.scheme, ref.bits) == (row.dataset, row.method, row.scheme, row.bits):
                return ref
        return None


def load_reference(path: PathLike | None = None) -> Reference:
    """A reference file (format: docs/sweeps.md); without `path` the thesis's tables shipped with
    qexport. Raises `BadData` naming the file and the first wrong field."""
    if path is None:
        src = "qexport/reference/thesis.json"
        raw = (resources.files("qexport") / "reference" / "thesis.json").read_bytes()
    else:
        src, raw = str(path), read_bytes(path)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadData(f"{src} is not a JSON reference file ({getattr(e, 'msg', 'not UTF-8')})") from None
    _need(isinstance(doc, dict), src, "a reference file is a JSON object with 'name' and 'rows'")
    _need(isinstance(doc.get("name"), str) and doc["name"].strip() != "", src, "'name' must be a non-empty string")
    for name in ("source", "metric", "note"):
        _need(isinstance(doc.get(name, ""), str), src, f"'{name}' must be a string")
    _need(isinstance(doc.get("rows"), list) and doc["rows"], src, "'rows' must be a non-empty list")
    rows, seen = [], set()
    for i, r in enumerate(doc["rows"]):
        where = f"{src} rows[{i}]"
        _need(isinstance(r, dict), where, "must be an object")
        for name in ("dataset", "method", "scheme"):
            _need(isinstance(r.get(name), str) and r[name] != "", where, f"'{name}' must be a non-empty string")
        _need(_integer(r.get("bits")) and r["bits"] >= 1, where, f"'bits' must be a positive integer, got {r.get('bits')!r}")
        _need(_number(r.get("mean")), where, f"'mean' must be a finite number, got {r.get('mean')!r}")
        _need(_number(r.get("std", 0.0)) and r.get("std", 0.0) >= 0, where, f"'std' must be a number >= 0, got {r.get('std')!r}")
        _need(isinstance(r.get("label", ""), str), where, "'label' must be a string")
        key = (r["dataset"], r["method"], r["scheme"], r["bits"])
        _need(key not in seen, where, f"repeats dataset/method/scheme/bits {'/'.join(map(str, key))}")
        seen.add(key)
        rows.append(RefRow(*key, mean=float(r["mean"]), std=float(r.get("std", 0.0)), label=r.get("label") or r["method"]))
    floats = doc.get("float", {})
    _need(isinstance(floats, dict), src, "'float' must map dataset names to [mean, std]")
    for ds, v in floats.items():
        _need(isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v), src,
              f"float.{ds} must be [mean, std], got {v!r}")
    return Reference(name=doc["name"], source=doc.get("source", ""), metric=doc.get("metric", ""), note=doc.get("note", ""),
                     rows=tuple(rows), float_acc={ds: (float(v[0]), float(v[1])) for ds, v in floats.items()})


def difference(row: Row, ref: RefRow) -> str:
    """ours − reference, marked ▼ when more than one reference std below, ▲ above, ≈ within."""
    d = row.mean - ref.mean
    mark = "▼" if d < -ref.std else "▲" if d > ref.std else "≈"
    return f"{mark} {d:+.2f}"


# ---------------------------------------------------------------- figures


def _bits(bits: int) -> str:
    return f"{bits} bit{'s' * (bits != 1)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


@dataclass(frozen=True)
class Plot:
    name: str  # file name under figures/
    alt: str
    png: bytes


def _series(rows: list[Row]) -> dict[tuple, list[Row]]:
    """Rows of one method (and code set, variant) across bit widths, in bits order."""
    out: dict[tuple, list[Row]] = {}
    for row in rows:
        out.setdefault((row.method, row.scheme, row.per_channel, row.variant), []).append(row)
    return {k: sorted(v, key=lambda w: w.bits) for k, v in sorted(out.items())}


def png_bytes(fig) -> bytes:
    """A matplotlib Figure as PNG, without the "Software: matplotlib x.y" chunk: the bytes depend on
    what is drawn only."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _draw(rows: list[Row], reference: Reference | None, stem: str) -> list[Plot]:
    """The figures of one (dataset, model): a box plot per bit width, accuracy against bits,
    against model bytes, and wall time per method."""
    # the object API, not pyplot: no global figure registry and no backend switch in the caller's
    # process; Figure.savefig renders PNG with Agg whatever the interactive backend is
    from matplotlib import rc_context, style
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # "2", "300", not "2×10⁰", on the log axes

    ds, model = rows[0].dataset, rows[0].model
    title = f"{ds} · {model}"
    float_acc = statistics.fmean(w.float_mean for w in rows)
    figures = []

    def save(fig, name: str, alt: str) -> None:
        figures.append(Plot(name, alt, png_bytes(fig)))

    # matplotlib's defaults, not the user's matplotlibrc: the same results give the same pixels
    with style.context("default"), rc_context({"font.size": 9}):
        for bits in sorted({w.bits for w in rows}):
            at = [w for w in rows if w.bits == bits]
            fig = Figure(figsize=(max(4.0, 1.1 * len(at) + 2), 4.0), layout="constrained")
            ax = fig.add_subplot()
            ax.boxplot([list(w.accs) for w in at])
            ax.set_xticks(range(1, len(at) + 1), [f"{w.label}\n{w.code_set}" for w in at])
            ax.axhline(float_acc, color="gray", linestyle="--", linewidth=1, label=f"float {float_acc:.2f}")
            refs = [(i + 1, m) for i, w in enumerate(at) if reference and (m := reference.match(w))]
            if refs:
                ax.errorbar([i for i, _ in refs], [m.mean for _, m in refs], yerr=[m.std for _, m in refs], fmt="D",
                            color="tab:red", capsize=3, label=f"{reference.name} mean ± std")
            lo, hi = ax.get_ylim()  # a reference std can reach past 0 or 100 %
            ax.set_ylim(max(lo, -0.5), min(hi, 100.5))
            ax.set(title=f"{title} · {_bits(bits)}", ylabel="test accuracy (%)")
            ax.legend(loc="best")
            save(fig, f"{stem}-{bits}b-box.png", f"{title}: accuracy by method over seeds, {_bits(bits)}")

        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = fig.add_subplot()
        for srs in _series(rows).values():
            ax.errorbar([w.bits for w in srs], [w.mean for w in srs], yerr=[w.std for w in srs], marker="o", capsize=3,
                        label=f"{srs[0].label} ({srs[0].code_set})")
        ax.axhline(float_acc, color="gray", linestyle="--", linewidth=1, label="float")
        bits = sorted({w.bits for w in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(bits, [str(b) for b in bits])
        ax.minorticks_off()
        ax.set(title=f"{title}: accuracy against bits", xlabel="bits per weight", ylabel="test accuracy (%)")
        ax.legend(fontsize=7)
        save(fig, f"{stem}-bits.png", f"{title}: accuracy against bits per method")

        sized = [w for w in rows if w.model_bytes]
        if sized:
            fig = Figure(figsize=(6.4, 4.0), layout="constrained")
            ax = fig.add_subplot()
            for srs in _series(sized).values():
                line, = ax.plot([w.model_bytes for w in srs], [w.mean for w in srs], marker="o",
                                label=f"{srs[0].label} ({srs[0].code_set})")
                for w in srs:
                    ax.annotate(f"{w.bits}b", (w.model_bytes, w.mean), textcoords="offset points", xytext=(3, 3),
                                fontsize=7, color=line.get_color())
            fb = _mean([w.float_bytes for w in rows])
            if fb:
                ax.plot([fb], [float_acc], marker="*", markersize=12, color="black", linestyle="none", label="float32")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 100, 200, 500, 1000 ...
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set(title=f"{title}: accuracy against model size", xlabel="model bytes (weights at their bit width)",
                   ylabel="test accuracy (%)")
            ax.legend(fontsize=7)
            save(fig, f"{stem}-size.png", f"{title}: accuracy against model bytes")

        timed = [w for w in rows if w.seconds is not None]
        if timed:
            fig = Figure(figsize=(6.4, 4.0), layout="constrained")
            ax = fig.add_subplot()
            labels = sorted({(w.label, w.code_set) for w in timed})
            bits = sorted({w.bits for w in timed})
            width = 0.8 / len(bits)
            for j, b in enumerate(bits):
                at = {(w.label, w.code_set): w.seconds for w in timed if w.bits == b}
                xs = [i + (j - (len(bits) - 1) / 2) * width for i, lab in enumerate(labels) if lab in at]
                # a log axis cannot show 0 s: a cell under a millisecond is drawn at 1 ms
                ax.bar(xs, [max(at[lab], 1e-3) for lab in labels if lab in at], width=width, label=_bits(b))
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.set_xticks(range(len(labels)), [f"{lab}\n{cs}" for lab, cs in labels])
            ax.set(title=f"{title}: wall time per cell", ylabel="seconds (mean over seeds)")
            ax.legend(fontsize=7)
            save(fig, f"{stem}-time.png", f"{title}: wall time per method")
    return figures


# ---------------------------------------------------------------- the document


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    alt: str
    name: str  # under figures/


# a block of the report: ("h1" | "h2" | "p", text), ("ul", tuple of items), Table or Image
Block = tuple | Table | Image


def _acc(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def _seconds(s: float | None) -> str:
    return DASH if s is None else f"{s:.2f}" if s < 10 else f"{s:.1f}" if s < 1000 else f"{s:.0f}"


def _describe_cell(r: dict) -> str:
    c = r["cell"]
    parts = [c["dataset"], c["model"], c["method"], f"{c['bits']} bits"]
    if c.get("scheme"):
        parts.append(str(c["scheme"]))
    if c.get("per_channel"):
        parts.append("per-channel")
    if c.get("params") or c.get("spec"):
        parts.append(_variant({**(c.get("params") or {}), **(c.get("spec") or {})}))
    parts.append(f"seed {c['seed']}")
    error = " ".join((r.get("error") or "no error message").split())
    return f"{', '.join(parts)}: {error}"


def _blocks(results: list[dict], reference: Reference | None, stems: dict[tuple[str, str], str],
            figures: dict[tuple[str, str], list[Plot]]) -> list[Block]:
    ok, failed = split_results(results)
    rows = aggregate(ok)
    out: list[Block] = [("h1", "qexport sweep report")]
    out.append(("p", f"Cells: {len(ok)} ok, {len(failed)} failed, {len(results)} in all; {len(rows)} rows "
                     "(mean ± sample std over seeds)."))
    versions = sorted({f"{k} {v}" for r in results for k, v in (r.get("versions") or {}).items()
                       if k in ("qexport", "torch") and isinstance(v, str)})
    if versions:
        out.append(("p", f"Versions: {', '.join(versions)}."))
    if reference:
        out.append(("p", f"Reference: {reference.name}: {reference.source}. {reference.note}".rstrip(". ") + "."))
        out.append(("p", "Difference = ours − reference: ▼ more than one reference std below, ▲ above, ≈ within."))
    if failed:
        out.append(("h2", "Failed cells"))
        out.append(("ul", tuple(sorted(_describe_cell(r) for r in failed))))
    for (ds, model), stem in stems.items():
        at = [w for w in rows if (w.dataset, w.model) == (ds, model)]
        out.append(("h2", f"{ds} · {model}"))
        float_bytes = _mean([w.float_bytes for w in at])
        line = f"Float model: test accuracy {statistics.fmean(w.float_mean for w in at):.2f}"
        line += f", {float_bytes / 1024:.1f} KiB as float32" if float_bytes else ""
        if reference and ds in reference.float_acc:
            line += f"; {reference.name}: float {_acc(*reference.float_acc[ds])}"
        out.append(("p", line + "."))
        # reference columns only where the reference has a number for some row (a table of our own
        # code sets next to the thesis's would be a column of dashes)
        compare = reference is not None and any(reference.match(w) for w in at)
        header = ["bits", "method", "code set", "n", "ours", "float"]
        if compare:
            header += [f"reference ({reference.name})", "difference"]
        header += ["model KiB", "s/cell", "verify"]
        table = []
        for w in at:
            cells = [str(w.bits), w.label, w.code_set, str(w.n), _acc(w.mean, w.std), f"{w.float_mean:.2f}"]
            if compare:
                m = reference.match(w)
                cells += [f"{_acc(m.mean, m.std)} ({m.label})", difference(w, m)] if m else [DASH, DASH]
            cells += [DASH if w.model_bytes is None else f"{w.model_bytes / 1024:.1f}", _seconds(w.seconds),
                      f"{w.verified}/{w.verify_total}" if w.verify_total else DASH]
            table.append(tuple(cells))
        out.append(Table(tuple(header), tuple(table)))
        out += [Image(f.alt, f.name) for f in figures[(ds, model)]]
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Table):
            lines.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
            lines.append("|" + "|".join("---:" if h in ("bits", "n") else "---" for h in b.header) + "|")
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
        elif isinstance(b, Image):
            lines.append(f"![{b.alt}](figures/{b.name})")
        elif b[0] == "ul":
            lines += [f"- {item}" for item in b[1]]
        else:
            lines.append({"h1": "# ", "h2": "## ", "p": ""}[b[0]] + b[1])
        lines.append("")
    return "\n".join(lines)


CSS = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
       "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
       "th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}")


def _html(blocks: list[Block], pngs: dict[str, bytes]) -> str:
    e = html.escape
    title = next((b[1] for b in blocks if isinstance(b, tuple) and b[0] == "h1"), "qexport report")
    parts = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(title)}</title>", f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Table):
            parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.rows]
            parts.append("</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(pngs[b.name]).decode("ascii")
            parts.append(f'<img alt="{e(b.alt)}" src="data:image/png;base64,{data}">')
        elif b[0] == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in b[1]) + "</ul>")
        else:
            parts.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    figures: tuple[Path, ...]
    html: Path | None = None


def check_out_dir(out_dir: PathLike, inputs: Sequence[PathLike | None] = ()) -> Path:
    """`out_dir` as the report's folder: not one of `inputs`, not an existing file, its parent exists."""
    out = Path(out_dir)
    for p in inputs:
        if p is not None and _same(out, Path(p)):
            raise OutputConflict(f"output folder {out} is the input {p}: choose another -o folder")
    if out.exists() and not out.is_dir():
        raise BadValue(f"output {out} exists and is not a folder: give a folder for the report (-o DIR)")
    if not out.parent.is_dir():
        raise UserError(f"folder {out.parent} does not exist: create it first or choose another -o folder")
    return out


def write_report(results: Sequence[dict], out_dir: PathLike, reference: Reference | None = None, html: bool = False,
                 *, inputs: Sequence[PathLike | None] = ()) -> ReportFiles:
    """Write OUT_DIR/report.md and OUT_DIR/figures/*.png (and OUT_DIR/report.html, self-contained,
    with `html`) for `results` as `load_results` returns them. Everything is drawn and every path
    checked (none may be one of `inputs`) before the first file is written; each file is written
    atomically. Existing files of an earlier report are replaced, other files left alone."""
    out = check_out_dir(out_dir, inputs)
    results = list(results)
    if not results:
        raise BadData("no results to report")
    rows = aggregate(results)
    stems: dict[tuple[str, str], str] = {}
    for key in sorted({(w.dataset, w.model) for w in rows}):
        stem = _slug(f"{key[0]}-{key[1]}")
        while stem in stems.values():  # two names that differ only in characters a file name cannot hold
            stem += "_"
        stems[key] = stem
    figures = {key: _draw([w for w in rows if (w.dataset, w.model) == key], reference, stem)
               for key, stem in stems.items()}
    blocks = _blocks(results, reference, stems, figures)
    pngs = {f.name: f.png for figs in figures.values() for f in figs}
    return write_document(out, blocks, pngs, html, inputs)


def write_document(out: Path, blocks: list[Block], pngs: dict[str, bytes], html: bool = False,
                   inputs: Sequence[PathLike | None] = ()) -> ReportFiles:
    """OUT/report.md and OUT/figures/*.png (and OUT/report.html, self-contained, with `html`) from
    `blocks` and the PNGs they name; `out` as `check_out_dir` returns it. Every path is checked
    (none may be one of `inputs`) before the first file is written; each is written atomically."""
    texts = {"report.md": _markdown(blocks)}
    if html:
        texts["report.html"] = _html(blocks, pngs)
    if out.is_dir():  # a new folder holds none of the inputs
        for path in [out / name for name in texts] + [out / "figures" / name for name in pngs]:
            if path.parent.is_dir():
                check_output_path(path, inputs)
    out.mkdir(exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    written = []
    for name, png in pngs.items():
        with atomic_path(out / "figures" / name) as tmp:
            tmp.write_bytes(png)
        written.append(out / "figures" / name)
    for name, text in texts.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return ReportFiles(markdown=out / "report.md", figures=tuple(written),
                       html=out / "report.html" if html else None)
