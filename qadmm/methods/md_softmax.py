"""MD-softmax-S (Ajanthan et al., AISTATS 2021): Mirror Descent with the softmax mirror map over
the code set's levels (exponentiated gradient on each weight's level probabilities); see
`qadmm.methods.md`."""
from __future__ import annotations

from torch import nn

from qadmm.data import Dataset
from qadmm.finetune import Hooks, Projector
from qadmm.methods import md
from qadmm.methods.md import Params, run
from qadmm.methods.method import Method
from qadmm.spec import QuantResult, QuantSpec

__all__ = ["METHOD", "Params", "hooks", "quantize"]


def hooks(model: nn.Module, spec: QuantSpec, p: Params, proj: Projector) -> Hooks:
    return md.hooks("softmax", model, spec, p, proj)


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    return run("softmax", "md-softmax", model, data, spec)


METHOD = Method("md-softmax", quantize, Params, __doc__,
                recalibrate=True,  # as every training method: BatchNorm's statistics were gathered before the final hard rounding
                hooks=hooks)
