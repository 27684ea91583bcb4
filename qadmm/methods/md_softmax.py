"""MD-softmax-S (Ajanthan et al., AISTATS 2021): Mirror Descent with the softmax mirror map over
the code set's levels (exponentiated gradient on each weight's level probabilities); see
`qadmm.methods.md`."""
from __future__ import annotations

from torch import nn

from qadmm.data import Dataset
from qadmm.methods.md import RECALIBRATE, Params, run
from qadmm.spec import QuantResult, QuantSpec

__all__ = ["Params", "RECALIBRATE", "quantize"]


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    return run("softmax", "md-softmax", model, data, spec)
