"""The `qexport analyze` report: which layer hurts, as report.md, figures/*.png and report.html.

From a `qadmm.sensitivity.Sensitivity` (each layer quantized alone at each width) and, for a quantized
model, the per-layer values along the network (`qadmm.sensitivity.along`): a table per view and three
figures: the layer's own output SQNR as a heat map (layers × widths), the network's drop with only that
layer quantized as a heat map, and for a quantized model its metric along the network (each layer alone,
and every layer up to it). Like the sweep reports (`qexport.report`) the files are a function of the
numbers alone: the same analysis gives the same bytes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from qadmm.sensitivity import AlongLayer, Sensitivity
from qexport.fileio import PathLike
from qexport.report import Block, Image, ReportFiles, Table, check_out_dir, png_bytes, write_document


def _num(v: float, fmt: str = ".1f") -> str:
    if not math.isfinite(v):
        return "inf"
    text = format(v, fmt)
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # "-0.0" (a tiny negative) reads 0.0


def _heat(rows: list[str], cols: list[str], values: list[list[float]], title: str, label: str, cmap: str) -> bytes:
    from matplotlib import rc_context, style
    from matplotlib.figure import Figure

    finite = [v for r in values for v in r if math.isfinite(v)] or [0.0]
    cap = max(finite)  # an exact layer (infinite SQNR) is drawn at the largest finite value
    grid = [[v if math.isfinite(v) else cap for v in r] for r in values]
    with style.context("default"), rc_context({"font.size": 8}):
        fig = Figure(figsize=(1.0 + 0.9 * len(cols) + 1.5, 1.2 + 0.28 * len(rows)), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(grid, aspect="auto", cmap=cmap)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        lo, hi = im.get_clim()
        for i, r in enumerate(values):
            for j, v in enumerate(r):  # white on the dark end of the colour map, black on the light end
                dark = (grid[i][j] - lo) / max(hi - lo, 1e-12) < 0.5
                ax.text(j, i, _num(v), ha="center", va="center", fontsize=7,
                        color="white" if dark == (cmap == "viridis") else "black")
        ax.set(title=title)
        fig.colorbar(im, ax=ax, label=label)
        return png_bytes(fig)


def _along_plot(metric: str, float_metric: float, steps: list[AlongLayer], quantized: float | None, title: str) -> bytes:
    from matplotlib import rc_context, style
    from matplotlib.figure import Figure

    with style.context("default"), rc_context({"font.size": 8}):
        fig = Figure(figsize=(max(5.0, 0.35 * len(steps) + 2), 4.0), layout="constrained")
        ax = fig.add_subplot()
        xs = range(len(steps))
        ax.plot(xs, [s.cumulative for s in steps], marker="o", label="this layer and every one before it")
        ax.plot(xs, [s.alone for s in steps], marker="x", linestyle="none", label="this layer alone")
        ax.axhline(float_metric, color="gray", linestyle="--", linewidth=1, label=f"float {float_metric:.2f}")
        if quantized is not None:
            ax.axhline(quantized, color="tab:red", linestyle=":", linewidth=1, label=f"the quantized model {quantized:.2f}")
        ax.set_xticks(list(xs), [s.name for s in steps], rotation=60, ha="right")
        ax.set(title=title, ylabel=metric)
        ax.legend(fontsize=7)
        return png_bytes(fig)


def blocks(title: str, sens: Sensitivity | None, along: tuple[str, float, list[AlongLayer]] | None = None,
           quantized: float | None = None) -> tuple[list[Block], dict[str, bytes]]:
    """The report's blocks and PNGs (see the module)."""
    out: list[Block] = [("h1", f"qexport analyze: {title}")]
    pngs: dict[str, bytes] = {}
    if sens is not None:
        names = [s.name for s in sens.layers]
        cols = [f"{b} bits" for b in sens.bits]
        out.append(("p", f"Each quantizable layer quantized alone ({'per channel' if sens.per_channel else 'per tensor'}, "
                         f"{'nearest α/Q fit' if sens.rounding == 'nearest' else sens.rounding + ' on its input Hessian'}). Float {sens.metric}: {sens.float_metric:.2f}. SQNR: the layer's own output on "
                         "calibration inputs, in dB (higher is better). Drop: the network's float metric minus its "
                         "metric with only that layer quantized."))
        header = ("layer", "params", *(f"{b}b bytes" for b in sens.bits), *(f"{b}b dB" for b in sens.bits),
                  *(f"{b}b drop" for b in sens.bits))
        rows = tuple((s.name, str(s.params), *(str(s.bytes[b]) for b in sens.bits), *(_num(s.sqnr_db[b]) for b in sens.bits),
                      *(_num(sens.float_metric - s.metric[b], ".2f") if b in s.metric else "—" for b in sens.bits))
                     for s in sens.layers)
        out.append(Table(header, rows))
        out.append(("ul", tuple(f"most sensitive at {b} bits: {', '.join(sens.ranking(b)[:3])}" for b in sens.bits
                                if all(b in s.metric for s in sens.layers))))
        pngs["sqnr.png"] = _heat(names, cols, [[s.sqnr_db[b] for b in sens.bits] for s in sens.layers],
                                 "each layer alone: its output SQNR", "dB", "viridis")
        out.append(Image("each layer alone: its output SQNR in dB, layers by widths", "sqnr.png"))
        if all(b in s.metric for s in sens.layers for b in sens.bits):
            pngs["drop.png"] = _heat(names, cols, [[sens.float_metric - s.metric[b] for b in sens.bits] for s in sens.layers],
                                     f"each layer alone: drop of {sens.metric}", "points", "magma_r")
            out.append(Image(f"each layer alone: drop of the network's {sens.metric}, layers by widths", "drop.png"))
    if along is not None:
        metric, float_metric, steps = along
        out.append(("h2", "Along the network"))
        out.append(("p", f"The quantized model's weights (and biases) put into the float model: each layer alone, and every "
                         f"layer up to it in forward order, each model scored with its BatchNorm statistics re-estimated on "
                         f"the calibration inputs (as the calibration back-ends deploy it). Float {metric}: {float_metric:.2f}"
                         + (f"; the quantized model itself (its re-estimated BatchNorm statistics and corrected biases "
                            f"included): {quantized:.2f}." if quantized is not None else ".")))
        out.append(Table(("layer", "its output dB", f"alone: {metric}", f"cumulative: {metric}", "step"),
                         tuple((s.name, _num(s.sqnr_db), f"{s.alone:.2f}", f"{s.cumulative:.2f}",
                                f"{s.cumulative - (steps[i - 1].cumulative if i else float_metric):+.2f}")
                               for i, s in enumerate(steps))))
        pngs["along.png"] = _along_plot(metric, float_metric, steps, quantized, f"{title}: where the {metric} goes")
        out.append(Image(f"the {metric} along the network, each layer alone and cumulatively", "along.png"))
    return out, pngs


def write(out_dir: PathLike, title: str, sens: Sensitivity | None, along: tuple[str, float, list[AlongLayer]] | None = None,
          quantized: float | None = None, html: bool = True, inputs: Sequence[PathLike | None] = ()) -> ReportFiles:
    """Write the report into `out_dir` (report.md, figures/, and report.html with `html`)."""
    out = check_out_dir(out_dir, inputs)
    doc, pngs = blocks(title, sens, along, quantized)
    return write_document(Path(out), doc, pngs, html, inputs)
