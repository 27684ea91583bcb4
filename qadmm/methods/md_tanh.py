"""MD-tanh-S (Ajanthan et al., AISTATS 2021): Mirror Descent with the tanh mirror map, extended
to any code set as a staircase of tanh steps; see `qadmm.methods.md`."""
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
    return md.hooks("tanh", model, spec, p, proj)


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    return run("tanh", "md-tanh", model, data, spec)


METHOD = Method("md-tanh", quantize, Params, __doc__,
                recalibrate=True,  # as every training method: BatchNorm's statistics were gathered before the final hard rounding
                hooks=hooks)
