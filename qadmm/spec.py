"""What to quantize (QuantSpec) and what a back-end returns (QuantResult)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from qadmm.codes import CodeSet, dequantize
from qadmm.errors import UserError

P = TypeVar("P")


@dataclass
class QuantSpec:
    """The user's request: code set, scale granularity, which layers, seed, method overrides."""

    bits: int = 4
    scheme: str | None = None  # None: binary at 1 bit, symmetric otherwise
    per_channel: bool = False
    keep_first: bool = False  # leave the first Linear/Conv2d float
    keep_last: bool = False  # leave the last Linear/Conv2d float
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # method hyperparameters overriding its defaults
    progress: bool = True
    calib_samples: int = 2048  # training images for calibration (GPTQ/LDNQ Hessians, BN re-estimation)
    bn_reestimate: bool | None = None  # re-estimate BatchNorm statistics afterwards; None: the method's default
    bias_correction: bool | None = None  # Nagel et al. 2019 bias correction of layers without BatchNorm after them; None: the method's default
    device: str = "cpu"  # where training-based back-ends run ("cuda" when present); results come back on the CPU

    @property
    def codes(self) -> CodeSet:
        try:
            return CodeSet(self.bits, self.scheme) if self.scheme else CodeSet.default(self.bits)
        except ValueError as e:
            raise UserError(str(e)) from None

    def resolve(self, params_cls: type[P]) -> P:
        """The method's hyperparameter dataclass with this spec's overrides, unknown keys refused."""
        names = {f.name: f for f in dataclasses.fields(params_cls)}
        unknown = sorted(set(self.params) - set(names))
        if unknown:
            raise UserError(f"unknown hyperparameter(s) {', '.join(unknown)} for this method: known are {', '.join(names)}")
        kw = {}
        for k, v in self.params.items():
            default = names[k].default
            try:
                kw[k] = type(default)(v) if default is not None and not isinstance(default, bool) else v
            except (TypeError, ValueError):
                raise UserError(f"hyperparameter {k}={v!r}: expected {type(default).__name__}") from None
            if isinstance(default, bool) and isinstance(v, str):
                kw[k] = v.lower() in ("1", "true", "yes", "on")
        return params_cls(**kw)


@dataclass
class LayerCodes:
    """One quantized layer: integer codes q (shape of the weight) and float32 scale alpha."""

    q: torch.Tensor
    alpha: torch.Tensor  # shape () per tensor, (C_out,) per channel
    codes: CodeSet

    @property
    def per_channel(self) -> bool:
        return self.alpha.dim() == 1

    def weight(self) -> torch.Tensor:
        return dequantize(self.q, self.alpha)


@dataclass
class QuantResult:
    """A back-end's output: the model with W = α·Q written into its quantized layers, the codes,
    the hyperparameters actually used, and the run's log (per layer or per iteration)."""

    model: nn.Module
    layers: dict[str, LayerCodes]
    method: str
    params: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    recalibration: dict[str, Any] = field(default_factory=dict)  # BN re-estimation / bias correction done after


def apply_codes(model: nn.Module, layers: dict[str, LayerCodes]) -> nn.Module:
    """Write W = α·Q into each named layer, in place: the fake-quant reference model."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, lc in layers.items():
            w = modules[name].weight
            if tuple(lc.q.shape) != tuple(w.shape):
                raise UserError(f"layer {name}: codes have shape {tuple(lc.q.shape)} but the weight has {tuple(w.shape)}")
            w.copy_(lc.weight())
    return model
