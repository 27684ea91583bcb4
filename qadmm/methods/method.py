"""The contract of a quantization back-end: what the registry (`qadmm.methods`) knows about it.

Each back-end module ends with `METHOD = Method(...)`: its name, its `quantize`, its `Params`
dataclass (hyperparameters and their defaults, the data `--help`, `--list-methods` and the docs
are made from) and its flags, typed, so a misspelt flag is an error rather than a default silently
turned off.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Callable


@dataclass(frozen=True)
class Method:
    name: str
    quantize: Callable[..., Any]  # (model, data, spec) -> QuantResult; never modifies the caller's model
    Params: type  # the hyperparameter dataclass
    doc: str  # the module's docstring: its first sentence is the one-line summary
    calibration_only: bool = False  # needs inputs only: unlabelled data will do
    recalibrate: bool = False  # BatchNorm re-estimation after it by default (its result leaves the statistics stale)
    bias_correction: bool = False  # Nagel et al. 2019 bias correction after it by default
    hooks: Callable[..., Any] | None = None  # (model, spec, params, projector) -> Hooks: it trains, also in the user's loop
    layer_solver: Callable[..., Any] | None = None  # (spec) -> its per-layer solver (`qadmm.layerwise.Solver`): it walks the layers

    @property
    def summary(self) -> str:
        return re.split(r"\.\s+(?=[A-Z])", " ".join(self.doc.split("\n\n")[0].split()))[0]

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in fields(self.Params)}
