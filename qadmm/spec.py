"""What to quantize (QuantSpec) and what a back-end returns (QuantResult)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, TypeVar

import torch
from torch import nn

from qadmm.codes import CodeSet, dequantize
from qadmm.errors import BadValue, UserError

P = TypeVar("P")


@dataclass(frozen=True)
class QuantSpec:
    """The user's request: code set, scale granularity, which layers, seed, method overrides.

    Layer patterns (`layer_bits`, `exclude`) are fnmatch globs on the qualified module names of
    `model.named_modules()` ("body.0", "features.*", "fc"); `qadmm.layers.select_layers` applies them.
    An excluded (or kept) layer stays float whatever `layer_bits` says about it.
    """

    bits: int = 4
    scheme: str | None = None  # None: binary at 1 bit, symmetric otherwise
    per_channel: bool = False
    keep_first: bool = False  # leave the first quantizable layer float
    keep_last: bool = False  # leave the last quantizable layer float
    layer_bits: dict[str, int] = field(default_factory=dict)  # pattern -> bits for matching layers; first match wins
    exclude: tuple[str, ...] = ()  # patterns of layers left float
    seed: int = 0
    params: Any = field(default_factory=dict)  # the method's hyperparameters: overrides by name, or its typed Params
    progress: bool = True
    calib_samples: int = 2048  # training images for calibration (GPTQ/LDNQ Hessians, BN re-estimation)
    bn_reestimate: bool | None = None  # re-estimate BatchNorm statistics afterwards; None: the method's default
    bias_correction: bool | None = None  # Nagel et al. 2019 bias correction of layers without BatchNorm after them; None: the method's default
    device: str = "cpu"  # where training-based back-ends run ("cuda" when present); results come back on the CPU

    def __post_init__(self) -> None:
        # a bare string would be read as one pattern per character
        object.__setattr__(self, "exclude", (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude or ()))
        object.__setattr__(self, "layer_bits", dict(self.layer_bits or {}))
        if not dataclasses.is_dataclass(self.params):  # overrides by name; or the method's Params, already resolved
            object.__setattr__(self, "params", dict(self.params or {}))

    # what an artifact records of the request (`meta["spec"]`; the method's params are recorded beside it)
    RECORDED = ("bits", "scheme", "per_channel", "keep_first", "keep_last", "layer_bits", "exclude", "seed",
                "calib_samples", "bn_reestimate", "bias_correction", "device")

    def to_json(self) -> dict[str, Any]:
        """The request as plain JSON (the artifact's `spec`): the code set's scheme resolved, so the
        file says which codes were used even where the default was asked for."""
        out = {k: getattr(self, k) for k in self.RECORDED}
        out.update(scheme=self.codes.scheme, exclude=list(self.exclude), layer_bits=dict(self.layer_bits))
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], params: dict[str, Any] | None = None) -> "QuantSpec":
        """The request `to_json` wrote (and the method's `params`), checked as any request is."""
        unknown = sorted(set(d) - set(cls.RECORDED))
        if unknown:
            raise BadValue(f"spec: unknown field(s) {', '.join(unknown)}: known are {', '.join(cls.RECORDED)}")
        spec = cls(**{k: (tuple(v) if k == "exclude" else v) for k, v in d.items()}, params=dict(params or {}), progress=False)
        spec.validate()
        return spec

    @property
    def codes(self) -> CodeSet:
        """The code set of every layer that no `layer_bits` pattern names."""
        try:
            return CodeSet(self.bits, self.scheme) if self.scheme else CodeSet.default(self.bits)
        except ValueError as e:
            raise UserError(str(e)) from None

    def codes_for(self, name: str) -> CodeSet:
        """The code set of layer `name`: `codes`, or for a layer named in `layer_bits` its own width with
        the spec's scheme where that scheme allows the width (else the default: binary at 1 bit)."""
        match = next(((pat, b) for pat, b in self.layer_bits.items() if fnmatchcase(name, pat)), None)
        if match is None:
            return self.codes
        pattern, bits = match
        _check_bits(pattern, bits)
        if self.scheme:
            try:
                return CodeSet(bits, self.scheme)
            except ValueError:
                pass
        return CodeSet.default(bits)

    def describe_codes(self) -> str:
        """The default code set in words, and whether some layers have their own width."""
        return self.codes.describe() + (f" (+ per-layer bits {self.layer_bits})" if self.layer_bits else "")

    def validate(self) -> None:
        """Refuse a bad code set, bit width or pattern before any work (patterns are matched later,
        against the model, by `qadmm.layers.select_layers`)."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise BadValue(f"seed {self.seed!r}: use a whole number from 0 to 2^32-1")
        self.codes
        for pattern, bits in self.layer_bits.items():
            if not isinstance(pattern, str) or not pattern:
                raise UserError(f"layer_bits pattern {pattern!r} is not a layer name or glob: use e.g. 'body.0' or 'features.*'")
            _check_bits(pattern, bits)
        for pattern in self.exclude:
            if not isinstance(pattern, str) or not pattern:
                raise UserError(f"exclude pattern {pattern!r} is not a layer name or glob: use e.g. 'body.0' or 'features.*'")

    def resolve(self, params_cls: type[P]) -> P:
        """The method's hyperparameter dataclass with this spec's overrides, unknown keys refused (a spec
        that already holds a `params_cls` instance, checked when it was made, gives that one)."""
        if isinstance(self.params, params_cls):
            return self.params
        if dataclasses.is_dataclass(self.params):
            raise UserError(f"hyperparameters {type(self.params).__module__}.{type(self.params).__name__} are not this "
                            f"method's ({params_cls.__module__}.{params_cls.__name__})")
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
                if v.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise BadValue(f"hyperparameter {k}={v!r}: expected true or false")
                kw[k] = v.lower() in ("1", "true", "yes", "on")
        out = params_cls(**kw)  # the method's own checks first: their messages are the most specific
        for k, v in kw.items():
            _check_number(k, v, names[k].default, getattr(params_cls, "POSITIVE", ()))
        return out


def _check_number(name: str, value: Any, default: Any, positive: tuple[str, ...] = ()) -> None:
    """Numeric hyperparameters are rates, penalties, counts and shares: finite and never negative;
    positive for those the method's Params lists in `POSITIVE` (0 elsewhere switches an option off,
    e.g. retrain_epochs=0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise BadValue(f"hyperparameter {name}={value}: must be a finite number")
    if name in positive and value <= 0:
        raise BadValue(f"hyperparameter {name}={value}: must be positive (default {default})")
    if value < 0:
        raise BadValue(f"hyperparameter {name}={value}: must be 0 or positive (default {default})")


def _check_bits(pattern: str, bits: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise UserError(f"layer_bits {pattern}={bits!r}: a bit width must be an integer from 1 to 8, e.g. {pattern}=8")


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
