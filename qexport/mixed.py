"""Mixed precision under a budget: one width per layer, chosen from measured sensitivities, then proven.

A `Budget` says how large the quantized layers may be (`size_bytes`, as `inspect` counts them: codes
at N bits plus 4 B per scale; or `avg_bits`, code bits per weight) and how much may be lost
(`max_drop`: points of accuracy, or of top-1 agreement with the float model without labels).
`search` measures once, per layer and allowed width, the output error of the layer quantized alone
as the request's back-end rounds one layer (gptq's and ldnq's layer solvers; the nearest fit
otherwise), on the calibration inputs (no labels needed; `qadmm.sensitivity`), allocates widths
under the size limit (`qadmm.sensitivity.allocate`), quantizes with the back-end and measures. With
`max_drop` it then looks for the smallest model that keeps the drop: the allocation at the size
limit first (if it loses too much, no smaller one is tried and the result says the target was not
met), then a bisection on the byte limit between the narrowest model and the last one that met it,
at most `max_steps` quantizations in all. Under a size limit alone, `max_steps` > 1 quantizes the best
allocations the knapsack gives (its optimum, then the optimum with each layer in turn denied its
width, by predicted error) and keeps the most accurate on the validation split: the additive model
of layer errors ranks near allocations imperfectly, a measurement does not. Every step is recorded.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from qadmm import methods
from qadmm.data import Dataset
from qadmm.errors import UserError
from qadmm.sensitivity import FLOAT, Judge, allocate, as_json, cost, relative_error, sensitivity
from qadmm.spec import QuantResult, QuantSpec
from qadmm.train import predict


@dataclass(frozen=True)
class Budget:
    size_bytes: int | None = None  # codes and scales of the quantized layers (fp32 weights of a layer kept float)
    avg_bits: float | None = None  # code bits per weight over the quantizable layers (a float layer counts 32)
    max_drop: float | None = None  # points of accuracy (or of top-1 agreement without labels) the search may lose
    bit_choices: tuple[int, ...] = (8, 4, 2, 1)
    allow_float: bool = False  # a layer may stay float (it then counts 4 B per weight)
    max_steps: int | None = None  # quantizations the search may run: a --max-drop search's tries (default 6); under
    # a size limit alone, how many of the best allocations are quantized and compared on the validation split (default 1)

    def __post_init__(self) -> None:
        self.validate()  # a Budget that exists is a valid one

    def validate(self) -> None:
        if self.size_bytes is None and self.avg_bits is None and self.max_drop is None:
            raise UserError("a budget needs a size (--size-budget or --avg-bits) or an accuracy (--max-drop)")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise UserError(f"--size-budget must be positive, got {self.size_bytes} B")
        if self.avg_bits is not None and not 0 < self.avg_bits <= FLOAT:
            raise UserError(f"--avg-bits must be in (0, {FLOAT}], got {self.avg_bits}")
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise UserError(f"--max-drop must be 0 or more (points), got {self.max_drop}")
        if not self.bit_choices or not all(1 <= int(b) <= 8 for b in self.bit_choices):
            raise UserError(f"bit choices {list(self.bit_choices)}: every width must be from 1 to 8")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1, got {self.max_steps}")


@dataclass
class Step:
    bytes_limit: int
    bytes: int
    avg_bits: float
    predicted_error: float  # Σ of the layers' relative output errors (the allocation's objective)
    metric: float | None  # accuracy (top-1 agreement, output SQNR) on the validation split; None when not measured
    drop: float | None
    met: bool | None


def validation_measure(model: nn.Module, data: Dataset, drop: bool) -> tuple[str, Callable[[nn.Module], float], float]:
    """(what is measured, metric(model), the float model's metric): accuracy on the validation split
    (the test split when there is none); without labels, top-1 agreement with the float model's class
    scores, or for another output its SQNR in dB (not for a `drop`, which is in points). The test
    split stays for the report: choosing on it would flatter the result."""
    on_val = len(data.x_val) > 0
    x = torch.as_tensor(np.asarray(data.x_val if on_val else data.x_test, np.float32))
    split = f"{'validation' if on_val else 'test'} split ({len(x)} samples)"
    ref = predict(model, x)
    y = np.asarray(data.y_val if on_val else data.y_test) if data.labelled else None
    classifier = ref.dim() == 2
    if y is None and not classifier and drop:
        raise UserError("--max-drop measures accuracy (labelled data) or top-1 agreement (class scores): this model's "
                        f"output {tuple(ref.shape[1:])} is neither; use --size-budget or --avg-bits alone")
    judge = Judge(x, ref, y, classifier)

    def metric(m: nn.Module) -> float:
        return round(judge(predict(m, x)), 3)

    what = (f"accuracy, {split}" if y is not None else f"top-1 agreement with the float model, {split}" if classifier
            else f"output SQNR in dB against the float model, {split}")
    return what, metric, metric(model) if y is not None else 100.0 if classifier else math.inf


def search(model: nn.Module, data: Dataset, spec: QuantSpec, budget: Budget, method: str,
           run: Callable[[QuantSpec], QuantResult]) -> tuple[QuantResult, QuantSpec, dict]:
    """The widths under `budget` (see the module), quantized by `run(spec)` (back-end `method`): the
    result, its spec and the record. The sensitivities are measured with the back-end's layer solver
    when it has one (gptq, ldnq), the nearest fit otherwise."""
    if spec.layer_bits or spec.scheme not in (None, "binary", "symmetric"):
        raise UserError("a budget chooses the widths itself: drop --layer-bits and --scheme")
    choices = sorted({int(b) for b in budget.bit_choices}, reverse=True)
    sens = sensitivity(model, data, choices, spec.per_channel, min(spec.calib_samples, 512), seed=spec.seed,
                       progress=spec.progress, evaluate=False, spec=spec,
                       solve=methods.layer_solver(method, spec), rounding=method)
    layers = sens.layers
    params = sum(s.params for s in layers)
    max_bits = None if budget.avg_bits is None else int(budget.avg_bits * params)
    steps = budget.max_steps if budget.max_steps is not None else 6 if budget.max_drop is not None else 1
    compare = budget.max_drop is None and steps > 1  # several allocations at the size limit, the best on validation
    measured, metric, float_metric = (validation_measure(model, data, drop=budget.max_drop is not None)
                                      if budget.max_drop is not None or compare else (None, None, None))

    def at(limit: int | None, banned: frozenset[tuple[str, int]] = frozenset()) -> dict[str, int]:
        return allocate(layers, limit, max_bits, budget.allow_float, banned)

    def size(choice: dict[str, int]) -> tuple[int, int]:
        return tuple(sum(cost(s, choice[s.name])[k] for s in layers) for k in (0, 1))  # type: ignore[return-value]

    def predicted(choice: dict[str, int]) -> float:
        return sum(relative_error(s, choice[s.name]) for s in layers)

    tried: dict[tuple, tuple[QuantResult, QuantSpec, Step, dict[str, int]]] = {}

    def step(limit: int, choice: dict[str, int] | None = None) -> tuple[QuantResult, QuantSpec, Step, dict[str, int]]:
        choice = at(limit) if choice is None else choice
        key = tuple(sorted(choice.items()))
        if key not in tried:
            widths = [b for b in choice.values() if b != FLOAT]
            q = dataclasses.replace(spec, bits=max(widths, default=spec.bits), scheme=None,
                                    layer_bits={n: b for n, b in choice.items() if b != FLOAT},
                                    exclude=tuple(spec.exclude) + tuple(n for n, b in choice.items() if b == FLOAT))
            result = run(q)
            nbytes, nbits = size(choice)
            m = drop = met = None
            if metric is not None:
                m = metric(result.model)
                drop = round(float_metric - m, 3) if math.isfinite(float_metric) else None
                met = None if budget.max_drop is None else drop <= budget.max_drop
            tried[key] = (result, q, Step(limit, nbytes, round(nbits / max(params, 1), 3), predicted(choice), m, drop, met), choice)
        return tried[key]

    # the size limit (--avg-bits alone: the bytes of the exact allocation under its bit limit)
    top = budget.size_bytes if budget.size_bytes is not None else size(at(None))[0]
    best = step(top, at(budget.size_bytes))
    if compare:  # the next-best allocations: each layer in turn denied its chosen width
        first = best[3]
        others = []
        for s in layers:
            try:
                others.append(at(budget.size_bytes, frozenset({(s.name, first[s.name])})))
            except UserError:  # that layer has no other width that fits
                continue
        for choice in sorted({tuple(sorted(c.items())): c for c in others if c != first}.values(), key=predicted)[:steps - 1]:
            candidate = step(top, choice)
            if candidate[2].metric > best[2].metric:
                best = candidate
    if budget.max_drop is not None and best[2].met:  # bisect the byte limit for the smallest model that still meets it
        lo, hi = size({s.name: min(s.bytes) for s in layers})[0], best[2].bytes
        while len(tried) < steps and lo < hi and at(lo) != at(hi):
            mid = (lo + hi) // 2
            candidate = step(mid)
            if candidate[2].met:
                best, hi = candidate, min(candidate[2].bytes, mid)
            else:
                lo = mid + 1
    result, qspec, chosen, choice = best
    record = {
        "size_budget": budget.size_bytes, "avg_bits_budget": budget.avg_bits, "max_drop": budget.max_drop,
        "bit_choices": choices, "allow_float": budget.allow_float,
        "allocation": ("greedy multiple-choice knapsack" if max_bits is not None and (budget.size_bytes is not None
                                                                    or budget.max_drop is not None)
                       else "multiple-choice knapsack, solved exactly")
                      + " on the layers' relative output errors"
                      + f", each layer quantized alone by {'its nearest fit' if sens.rounding == 'nearest' else sens.rounding}"
                      + " (qadmm.sensitivity.allocate)"
                      + ("; then a bisection on the byte limit for the smallest model within --max-drop" if budget.max_drop is not None
                         else f"; then the {len(tried)} best allocations by that error (each layer in turn denied its "
                              "width), quantized, the most accurate on the validation split kept" if compare else ""),
        "chosen": {n: b for n, b in choice.items() if b != FLOAT}, "kept_float": [n for n, b in choice.items() if b == FLOAT],
        "bytes": chosen.bytes, "avg_bits": chosen.avg_bits, "rounding": sens.rounding,
        "predicted_sum_rel_output_error": chosen.predicted_error,
        "sqnr_db": {s.name: as_json(s.sqnr_db) for s in layers},
        "steps": [dataclasses.asdict(t[2]) for t in tried.values()],
        "kept_step": 1 + [t[3] for t in tried.values()].index(choice),
    }
    if metric is not None:
        record.update(measured_on=measured, float_metric=float_metric if math.isfinite(float_metric) else None)
    if budget.max_drop is not None:
        record.update(drop=chosen.drop, met=bool(chosen.met))
    return result, qspec, record
