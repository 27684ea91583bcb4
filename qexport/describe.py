"""`qexport inspect`: what is inside an artifact, as tables."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qexport.artifact import describe_output, load_artifact


def _hist(q: torch.Tensor, levels: list[int]) -> str:
    counts = torch.bincount((q.to(torch.int64).flatten() - levels[0]), minlength=levels[-1] - levels[0] + 1)
    if len(levels) > 9:  # too many codes to list: show spread instead
        nz = (q == 0).float().mean() * 100
        return f"|q| mean {q.abs().float().mean():.1f}, max {int(q.abs().max())}, zeros {nz:.0f}%"
    total = max(int(counts.sum()), 1)
    return " ".join(f"{v:+d}:{100 * int(counts[v - levels[0]]) / total:.0f}%" for v in levels)


def describe_preprocessing(pre: dict) -> str:
    """One line: what the deployed graph does to the raw input before the model."""
    if pre.get("type") != "standardize":
        return "raw (no normalisation)"
    m, s = np.asarray(pre["mean"]).ravel(), np.asarray(pre["std"]).ravel()
    shown = f"mean {m[0]:.4g} std {s[0]:.4g}" if m.size == 1 else f"{m.size} means/stds"
    return f"standardised ({shown}; {pre.get('fitted_on', 'given')})"


def describe(path: str | Path, as_json: bool = False) -> str:
    from qexport.artifact import read_header
    from qexport.pack.packfile import FORMAT as PACKED_FORMAT, describe_packed

    if read_header(path).get("format") == PACKED_FORMAT:  # a `qexport pack` file
        return describe_packed(path, as_json)
    art = load_artifact(path)
    if as_json:
        return json.dumps({"sha256": art.sha256, **art.meta}, indent=2, sort_keys=True)
    m = art.meta
    arch, ds, method, acc = m["architecture"], m.get("dataset", {}), m.get("method", {}), m.get("accuracy", {})
    ops = m.get("graph", {}).get("ops", [])

    def pct(v) -> str:
        return f"{v:.2f}%" if isinstance(v, (int, float)) else "?"

    lines = [f"{path}: qexport artifact (sha256 {art.sha256[:16]})",
             f"model {arch.get('model', '?')} input {tuple(arch['input_shape'])} {describe_output(arch)}; "
             f"dataset {ds.get('name', '?')} (seed {ds.get('seed', '?')})",
             f"input: {describe_preprocessing(m.get('preprocessing', {}))}",
             f"graph: {len(ops)} ops ({', '.join(sorted({o['kind'] for o in ops}))})",
             f"method {method.get('name', '?')} {json.dumps(method.get('params', {}), sort_keys=True)}",
             f"spec: {json.dumps({k: v for k, v in m.get('spec', {}).items() if v not in (None, False, [], {})}, sort_keys=True)}",
             f"accuracy: float {pct(acc.get('float_test'))}  quantized {pct(acc.get('quantized_test'))}"
             if acc.get("float_test") is not None else f"agreement with the float model: {describe_agreement(m.get('agreement', {}))}",
             *([describe_mixed(m["mixed_precision"]).strip()] if "mixed_precision" in m else []),
             ""]
    header = f"{'layer':24s} {'shape':16s} {'codes':18s} {'alpha range':23s} {'bytes@N':>9s} {'fp32':>9s}  histogram"
    lines += [header, "-" * len(header)]
    tot_q = tot_f = 0
    for name, lc in art.layers.items():
        n = lc.q.numel()
        nbytes = -(-n * lc.codes.storage_bits // 8)
        tot_q, tot_f = tot_q + nbytes, tot_f + 4 * n
        a = lc.alpha.flatten()
        arange = f"{float(a.min()):.3g}" + (f"..{float(a.max()):.3g}" if a.numel() > 1 else "")
        lines.append(f"{name:24s} {str(tuple(lc.q.shape)):16s} {lc.codes.scheme + ' ' + str(lc.codes.bits) + 'b':18s} "
                     f"{arange:23s} {nbytes:9d} {4 * n:9d}  {_hist(lc.q, lc.codes.levels)}")
    floats = sum(p.numel() for k, p in art.model.state_dict().items() if k.rsplit('.', 1)[0] not in art.layers or not k.endswith("weight"))
    lines.append(f"{'quantized weights':24s} {'':16s} {'':18s} {'':23s} {tot_q:9d} {tot_f:9d}  ({tot_f / max(tot_q, 1):.1f}x smaller)")
    lines.append(f"float parameters and buffers kept: {floats} values ({4 * floats} bytes)")
    lines.append(f"versions: {json.dumps(m.get('versions', {}), sort_keys=True)}")
    return "\n".join(lines)


def describe_agreement(a: dict) -> str:
    """SQNR, cosine and (class scores) top-1 agreement of the quantized model with the float one."""
    parts = [f"SQNR {a['sqnr_db']:.1f} dB" if a.get("sqnr_db") is not None else "SQNR inf (identical)",
             f"cosine {a.get('cosine', float('nan')):.5f}"]
    if a.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {a['top1_agreement']:.2f}%")
    return ", ".join(parts)


def describe_mixed(mp: dict) -> str:
    """The widths a budget chose, their size, and each step of a --max-drop search."""
    limits = [f"{mp['size_budget']} B" if mp.get("size_budget") is not None else "",
              f"{mp['avg_bits_budget']} bits on average" if mp.get("avg_bits_budget") is not None else "",
              f"a drop of at most {mp['max_drop']} points" if mp.get("max_drop") is not None else ""]
    widths = ", ".join([f"{n}={b}" for n, b in mp["chosen"].items()] + [f"{n}=float" for n in mp.get("kept_float", [])])
    lines = [f"  mixed precision under {' and '.join(v for v in limits if v)}: {mp['bytes']} B of codes and scales, "
             f"{mp['avg_bits']} bits per weight on average ({widths})"]
    measured = mp.get("measured_on", mp.get("drop_measured_on"))  # the key of artifacts before allocations were compared
    if mp.get("max_drop") is not None:
        lines.append(f"  search ({measured}; float {mp['float_metric']:.2f}):")
        for i, st in enumerate(mp["steps"], 1):
            lines.append(f"    step {i}: limit {st['bytes_limit']} B -> {st['bytes']} B, {st['avg_bits']} bits, "
                         f"{st['metric']:.2f} (drop {st['drop']:+.2f}) {'meets' if st['met'] else 'too much'}")
        lines.append(f"  max drop {mp['max_drop']} {'met' if mp['met'] else 'NOT met'}: drop {mp['drop']:.2f} points"
                     + ("" if mp["met"] else " at the largest model allowed; raise the size limit, allow wider "
                        "--bit-choices or --allow-float"))
    elif len(mp["steps"]) > 1:  # several allocations under the size limit, compared
        float_metric = "" if mp.get("float_metric") is None else f"; float {mp['float_metric']:.2f}"
        lines.append(f"  {len(mp['steps'])} allocations compared ({measured}{float_metric}):")
        for i, st in enumerate(mp["steps"], 1):
            kept = i == mp.get("kept_step")
            lines.append(f"    {i}: {st['bytes']} B, {st['avg_bits']} bits, predicted error {st['predicted_error']:.4f}, "
                         f"{st['metric']:.2f}{'  <- kept' if kept else ''}")
    return "\n".join(lines)
