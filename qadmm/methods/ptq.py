"""PTQ: post-training quantization. Each weight tensor is projected onto the code set with the
alternating α/Q fit (thesis Algorithm 4); biases, BatchNorm and kept layers stay float, and BatchNorm
statistics are re-estimated afterwards on calibration images (on by default; --no-bn-reestimate)."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import ClassVar

from torch import nn

from qadmm.codes import fit
from qadmm.data import Dataset
from qadmm.layers import select_layers
from qadmm.methods.method import Method
from qadmm.spec import LayerCodes, QuantResult, QuantSpec, apply_codes




@dataclass
class Params:
    POSITIVE: ClassVar[tuple[str, ...]] = ("max_iter",)  # meaningless at 0: step sizes, penalties, counts
    max_iter: int = 30  # alternating α/Q rounds per start
    patience: int = 3  # stop after this many non-improving rounds


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    p = spec.resolve(Params)
    model = copy.deepcopy(model)
    layers = {}
    history = []
    for name, m in select_layers(model, spec):
        codes = spec.codes_for(name)
        f = fit(m.weight.detach(), codes, spec.per_channel, max_iter=p.max_iter, patience=p.patience)
        layers[name] = LayerCodes(f.q, f.alpha, codes)
        rel = (f.error / max(float((m.weight.detach() ** 2).sum()), 1e-30)) ** 0.5
        history.append({"layer": name, "rel_error": rel})
    apply_codes(model, layers)
    return QuantResult(model, layers, "ptq", asdict(p), history)


METHOD = Method("ptq", quantize, Params, __doc__,
                calibration_only=True,  # inputs only: unlabelled data will do
                recalibrate=True)  # nothing here trains BatchNorm: re-estimate its statistics afterwards
