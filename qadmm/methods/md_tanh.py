"""MD-tanh-S (Ajanthan et al., AISTATS 2021): Mirror Descent with the tanh mirror map, extended
to any code set as a staircase of tanh steps; see `qadmm.methods.md`."""
from __future__ import annotations

from torch import nn

from qadmm.data import Dataset
from qadmm.methods.md import RECALIBRATE, Params, run
from qadmm.spec import QuantResult, QuantSpec

__all__ = ["Params", "RECALIBRATE", "quantize"]


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    return run("tanh", "md-tanh", model, data, spec)
