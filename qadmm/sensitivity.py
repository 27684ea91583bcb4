"""Which layer hurts: each quantizable layer quantized alone, at each width of a set.

Per layer and width, with ΔW = W − α·Q the nearest α/Q fit (`codes.fit`, what ptq does) or what a
calibration back-end's layer solver makes of the layer alone (gptq, ldnq: `qadmm.layerwise.Solver`):
- the layer's own output error, as an SQNR in dB on calibration inputs,
  10·log10(tr(W H Wᵀ) / tr(ΔW H ΔWᵀ)) with H = XᵀX/n the layer's input Hessian in the float network
  (`layer_inputs`), computed once per layer and shared by every width;
- the network's accuracy on test samples with only that layer quantized (top-1 agreement with the
  float model when the data has no labels).
Fit and Hessian are what `ptq` and `gptq` start from, so a layer that is fragile here is the first to
keep at more bits.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qadmm.codes import CodeSet, fit
from qadmm.data import Dataset
from qadmm.layer_inputs import input_hessian, weight_matrix
from qadmm.layers import select_layers
from qadmm.layerwise import Solver, layer_codes, output_error
from qadmm.recalibrate import batchnorms, reestimate_bn
from qadmm.spec import QuantSpec
from qadmm.train import agreement, predict, top1


EVAL_BATCH = 256  # small enough that a CNN's activations stay in cache: 2.5x faster than 1024 on ResNet-20


def as_json(per_width: dict[int, float]) -> dict[str, float | None]:
    """Values per width as plain JSON (an exact layer's infinite SQNR is null)."""
    return {str(b): (v if math.isfinite(v) else None) for b, v in per_width.items()}


@dataclass
class LayerSensitivity:
    name: str
    params: int
    bytes: dict[int, int]  # width -> codes at that width + one fp32 scale per channel (or tensor)
    sqnr_db: dict[int, float] = field(default_factory=dict)  # the layer's own output, calibration inputs
    metric: dict[int, float] = field(default_factory=dict)  # network accuracy (or agreement) with only it quantized


@dataclass
class Sensitivity:
    metric: str  # "accuracy" (labelled test data) or "top1 agreement" / "sqnr_db" (no labels)
    float_metric: float
    bits: list[int]
    per_channel: bool
    layers: list[LayerSensitivity]
    rounding: str = "nearest"  # what quantized each layer: the nearest α/Q fit, or a method's layer solver ("gptq", "ldnq")

    def to_json(self) -> dict:
        """Plain JSON (an exact layer, infinite SQNR, is null)."""
        return {"metric": self.metric, "float_metric": self.float_metric, "bits": self.bits, "per_channel": self.per_channel,
                "rounding": self.rounding,
                "layers": [{"name": s.name, "params": s.params, "bytes": {str(b): v for b, v in s.bytes.items()},
                            "sqnr_db": as_json(s.sqnr_db), "metric": as_json(s.metric)} for s in self.layers]}

    def ranking(self, bits: int) -> list[str]:
        """Layer names from most to least sensitive at `bits` (largest metric drop, then lowest SQNR)."""
        return [s.name for s in sorted(self.layers, key=lambda s: (s.metric[bits], s.sqnr_db[bits]))]


@dataclass
class Judge:
    """The network's metric on test samples: accuracy with labels; without, top-1 agreement with the
    float model's outputs `ref` (class scores) or their SQNR in dB. `judge(outputs)` scores outputs on `x`."""

    x: torch.Tensor
    ref: torch.Tensor
    y: np.ndarray | None
    classifier: bool

    @classmethod
    def of(cls, model: nn.Module, data: Dataset, eval_samples: int | None) -> "Judge":
        x = torch.as_tensor(np.asarray(data.x_test[:eval_samples], np.float32))
        ref = predict(model, x, EVAL_BATCH)
        return cls(x, ref, np.asarray(data.y_test[:eval_samples]) if data.labelled else None,
                   ref.dim() == 2 and data.num_classes > 0)

    @property
    def metric(self) -> str:
        return "accuracy" if self.y is not None else ("top1 agreement" if self.classifier else "sqnr_db")

    def __call__(self, out: torch.Tensor) -> float:
        if self.y is not None:
            return top1(out, self.y)
        a = agreement(self.ref, out, self.classifier)
        v = a["top1_agreement"] if self.classifier else a["sqnr_db"]
        return math.inf if v is None else float(v)  # None: identical outputs


@contextmanager
def reestimated(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Inside the block the model's BatchNorm statistics are re-estimated on x (as the calibration
    back-ends deploy a quantized model); its own statistics are back after."""
    bns = batchnorms(model)
    saved = copy.deepcopy([bn.state_dict() for bn in bns])
    if bns:
        reestimate_bn(model, x)
    try:
        yield
    finally:
        for bn, st in zip(bns, saved):
            bn.load_state_dict(st)


@torch.no_grad()
def sensitivity(model: nn.Module, data: Dataset, bits: list[int], per_channel: bool = True, calib_samples: int = 512,
                eval_samples: int | None = 2000, seed: int = 0, progress: bool = False, evaluate: bool = True,
                spec: QuantSpec | None = None, solve: Solver | None = None, rounding: str = "nearest") -> Sensitivity:
    """Each quantizable layer of `model` quantized alone at each width in `bits` (see the module),
    rounded to its nearest fit, or by `solve` (the layer solver of the method named `rounding`,
    `qadmm.methods.layer_solver`: gptq's and ldnq's errors are far below the nearest fit's, and not
    by the same factor on every layer).
    `evaluate` False: the SQNRs only (no network runs on test data). `spec` selects the layers
    (exclude, keep_first/last) as quantization will."""
    model = model.eval()
    x = data.calibration(calib_samples, seed)
    judge = Judge.of(model, data, eval_samples)
    x_eval, ref, score, metric = judge.x, judge.ref, judge, judge.metric
    layers = select_layers(model, spec or QuantSpec(bits=max(bits), per_channel=per_channel))
    out = []
    for name, m in tqdm(layers, desc="analyze", disable=not progress):
        w = weight_matrix(m).double()
        h = input_hessian(model, m, x)
        base = max(output_error(w, h), 1e-300)
        scales = m.weight.shape[0] if per_channel else 1
        s = LayerSensitivity(name, m.weight.numel(), {b: -(-m.weight.numel() * CodeSet.default(b).storage_bits // 8) + 4 * scales
                                                      for b in bits})
        original = m.weight.detach().clone()
        for b in bits:
            codes = CodeSet.default(b)
            f = fit(original, codes, per_channel)
            wq = f.dequantize() if solve is None else layer_codes(*solve(w, h, codes, f)[:2], m.weight.shape, codes, per_channel).weight()
            err = output_error(w - wq.reshape(len(w), -1).double(), h)
            s.sqnr_db[b] = round(10 * math.log10(base / err), 3) if err > 0 else math.inf
            if evaluate:
                m.weight.copy_(wq)
                s.metric[b] = round(score(predict(model, x_eval, EVAL_BATCH)), 3)
                m.weight.copy_(original)
        out.append(s)
    return Sensitivity(metric, round(score(ref), 3), list(bits), per_channel, out, rounding if solve is not None else "nearest")


@dataclass
class AlongLayer:
    name: str
    sqnr_db: float  # the layer's own output with the given (quantized) weights, float network, calibration inputs
    alone: float  # the network's metric with only this layer's weights replaced
    cumulative: float  # ... with this layer and every one before it (forward order) replaced


@torch.no_grad()
def along(model: nn.Module, replaced: dict[str, dict[str, torch.Tensor]], data: Dataset, calib_samples: int = 512,
          eval_samples: int | None = 2000, seed: int = 0, progress: bool = False,
          bn_reestimate: bool = True) -> tuple[str, float, list[AlongLayer]]:
    """Where the accuracy goes in a quantized model: `replaced` maps layer names of the float `model`
    to the parameters a quantized model gives them ({"weight": α·Q, "bias": ...}); each is put in alone,
    and cumulatively in forward order. Returns (metric, float metric, per layer). With `bn_reestimate`
    each of those models has its BatchNorm statistics re-estimated on the calibration inputs before it
    is scored, as the calibration back-ends deploy it (without, a deep network's float statistics
    turn a small weight change into a large drop that the deployed model does not have)."""
    model = model.eval()
    x = data.calibration(calib_samples, seed)
    judge = Judge.of(model, data, eval_samples)

    def measure(out: torch.Tensor) -> float:
        return round(judge(out), 3)

    def score() -> float:  # the model as it stands, its BatchNorm statistics re-estimated for the score only
        with reestimated(model, x) if bn_reestimate else nullcontext():
            return measure(predict(model, judge.x, EVAL_BATCH))

    metric, float_metric = judge.metric, measure(judge.ref)
    modules = dict(model.named_modules())
    order = [n for n, _ in select_layers(model, QuantSpec(bits=8)) if n in replaced]
    missing = sorted(set(replaced) - set(order))
    if missing:
        from qadmm.errors import UserError

        raise UserError(f"layers {', '.join(missing)} of the quantized model are not quantizable layers of the float model: "
                        "give the float checkpoint the artifact was made from")
    saved = {n: {k: getattr(modules[n], k).detach().clone() for k in replaced[n]} for n in order}

    def put(name: str, params: dict[str, torch.Tensor]) -> None:
        for k, v in params.items():
            getattr(modules[name], k).copy_(v.reshape(getattr(modules[name], k).shape))

    out = []
    for name in tqdm(order, desc="along", disable=not progress):
        m = modules[name]
        w = weight_matrix(m).double()
        h = input_hessian(model, m, x)
        err = output_error(w - replaced[name]["weight"].reshape(len(w), -1).double(), h)
        sqnr = round(10 * math.log10(max(output_error(w, h), 1e-300) / err), 3) if err > 0 else math.inf
        out.append(AlongLayer(name, sqnr, math.nan, math.nan))
    for step in out:  # alone: one layer at a time
        put(step.name, replaced[step.name])
        step.alone = score()
        put(step.name, saved[step.name])
    for step in out:  # cumulative: the layers so far stay replaced
        put(step.name, replaced[step.name])
        step.cumulative = score()
    for name in order:
        put(name, saved[name])
    return metric, float_metric, out


FLOAT = 32  # the width of a layer kept float (fp32 weights, no scale) when an allocation may keep one


def relative_error(s: LayerSensitivity, width: int) -> float:
    """Layer `s`'s relative output error at `width`, 10^(−SQNR/10): what an allocation adds up (0 when float or exact)."""
    return 0.0 if width == FLOAT or not math.isfinite(s.sqnr_db[width]) else 10 ** (-s.sqnr_db[width] / 10)


def cost(s: LayerSensitivity, width: int) -> tuple[int, int]:
    """(bytes, code bits) of layer `s` at `width`: codes and scales as `inspect` counts them, or fp32 weights."""
    return (4 * s.params, FLOAT * s.params) if width == FLOAT else (s.bytes[width], s.params * width)


def allocate(layers: list[LayerSensitivity], max_bytes: int | None = None, max_bits: int | None = None,
             allow_float: bool = False, banned: frozenset[tuple[str, int]] = frozenset()) -> dict[str, int]:
    """A width per layer, from the widths measured (and FLOAT with `allow_float`) but the (layer, width)
    pairs `banned` (how a search asks for the next-best allocations), that keeps the
    bytes ≤ `max_bytes` and the code bits Σ params·width ≤ `max_bits` (either may be None: no limit)
    and makes the predicted loss Σ_l ε_l small, with ε_l = 10^(−SQNR_l/10) the layer's relative
    output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) as `sensitivity` measured it (0 for a float layer): a
    second-order, Hessian-based sensitivity as in HAWQ-V3 (Yao et al., ICML 2021, which weighs the
    loss Hessian and solves an integer program). With one limit the allocation is that
    multiple-choice knapsack solved exactly (`knapsack`, dynamic programming over the limit). With
    both, it is the knapsack's greedy: every layer starts at its narrowest width, then the upgrade
    with the largest drop of ε per added byte that still fits is taken, until none fits (the greedy
    can spend the budget on small upgrades and leave none for a large layer's). A UserError when
    even the narrowest widths do not fit."""
    from qadmm.errors import UserError

    def fits(nbytes: int, nbits: int) -> bool:
        return (max_bytes is None or nbytes <= max_bytes) and (max_bits is None or nbits <= max_bits)

    options = {s.name: [b for b in sorted(s.bytes) + ([FLOAT] if allow_float else []) if (s.name, b) not in banned]
               for s in layers}
    choice = {s.name: options[s.name][0] for s in layers}
    used = [sum(cost(s, choice[s.name])[k] for s in layers) for k in (0, 1)]
    if not fits(*used):
        narrow = min(choice.values())
        if max_bytes is not None and used[0] > max_bytes:
            raise UserError(f"size budget {max_bytes} B is below the smallest model these widths allow ({used[0]} B, every "
                            f"layer at {narrow} bit(s)): raise --size-budget or allow narrower --bit-choices")
        raise UserError(f"an average of {max_bits / max(sum(s.params for s in layers), 1):.3g} bits is below the narrowest "
                        f"width allowed ({narrow}): raise --avg-bits or allow narrower --bit-choices")
    if (max_bytes is None) != (max_bits is None):  # one limit: the exact optimum
        k, limit = (0, max_bytes) if max_bytes is not None else (1, max_bits)
        picks = knapsack([[(cost(s, b)[k], relative_error(s, b)) for b in options[s.name]] for s in layers], limit)
        return {s.name: options[s.name][j] for s, j in zip(layers, picks)}
    while True:
        best = None
        for s in layers:
            cur = cost(s, choice[s.name])
            for b in options[s.name]:
                new = cost(s, b)
                extra = new[0] - cur[0]
                if b > choice[s.name] and fits(used[0] + extra, used[1] + new[1] - cur[1]):
                    gain = (relative_error(s, choice[s.name]) - relative_error(s, b)) / max(extra, 1)
                    if gain > 0 and (best is None or gain > best[0]):
                        best = (gain, s, b)
        if best is None:
            return choice
        _, s, b = best
        old, new = cost(s, choice[s.name]), cost(s, b)
        used = [used[k] + new[k] - old[k] for k in (0, 1)]
        choice[s.name] = b


def knapsack(items: list[list[tuple[int, float]]], limit: int) -> list[int]:
    """One option per item, options given as (weight, value), minimising Σ value with Σ weight ≤ limit:
    the multiple-choice knapsack solved exactly by dynamic programming over the total weight (in
    units of the weights' greatest common divisor). Of equally good choices, the lightest; the first
    options (which must fit together) are the fallback."""
    g = 0
    for opts in items:
        for w, _ in opts:
            g = math.gcd(g, int(w))
    g = max(g, 1)
    cap = int(limit) // g
    best = np.full(cap + 1, np.inf)  # best[c]: the least Σ value of the items so far weighing exactly c·g
    best[0] = 0.0
    picks = np.zeros((len(items), cap + 1), np.int16)
    for i, opts in enumerate(items):
        new = np.full(cap + 1, np.inf)
        for j, (w, v) in enumerate(opts):
            w = int(w) // g
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[:cap + 1 - w] + v
            better = cand < new
            new[better], picks[i][better] = cand[better], j
        best = new
    c = int(np.argmin(best))  # the first minimum: the lightest of the best
    if not np.isfinite(best[c]):
        return [0] * len(items)
    out = [0] * len(items)
    for i in reversed(range(len(items))):
        out[i] = int(picks[i][c])
        c -= int(items[i][out[i]][0]) // g
    return out
