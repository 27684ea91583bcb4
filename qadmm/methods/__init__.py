"""The registry of quantization back-ends.

Every back-end is one module here with a `Params` dataclass (its hyperparameters and their
defaults) and one function with one signature:

    quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult

`model` is the trained float model (the back-end may modify a copy, never the caller's object);
`spec.resolve(Params)` gives the hyperparameters with the user's overrides.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

from qadmm.data import Dataset
from qadmm.errors import UserError
from qadmm.spec import QuantResult, QuantSpec

METHODS: dict[str, str] = {
    "ptq": "qadmm.methods.ptq",
    "ste": "qadmm.methods.ste",
    "admm-q": "qadmm.methods.admmq",
    "proxquant": "qadmm.methods.proxquant",
    "qnn-admm": "qadmm.methods.qnn_admm",
    "lq": "qadmm.methods.lq",
}


def get_method(name: str) -> ModuleType:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name])


def quantize(name: str, model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    """Run back-end `name` on a trained float model."""
    spec.codes  # validate bits/scheme before any work
    return get_method(name).quantize(model, data, spec)
