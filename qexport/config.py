"""One request, typed: a back-end and everything asked of it, torchao-style.

    art = qexport.quantize(model, data, qexport.GPTQ(bits=4, per_channel=True, damp=0.01))

`Config(method, spec)` pairs a back-end's name with a `QuantSpec` whose `params` are that back-end's
hyperparameters; it is checked once, when it is made (unknown method, code set, hyperparameter or
value: one `UserError`). One constructor per back-end (`qexport.GPTQ`, `qexport.STE`, ... see
`CONSTRUCTORS`) takes the spec's fields and the method's hyperparameters as keywords and sorts them.
`to_json` / `from_json` carry a request whole (an artifact's `method` and `spec` entries are the
same data), so a request can be stored, compared and run again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

from qadmm import methods
from qadmm.errors import UserError
from qadmm.spec import QuantSpec

SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec) if f.name != "params")
# the Python names of the per-method constructors (qexport.GPTQ, ...)
CONSTRUCTORS = {"PTQ": "ptq", "GPTQ": "gptq", "LDNQ": "ldnq", "LQ": "lq", "STE": "ste", "ADMMQ": "admm-q",
                "ProxQuant": "proxquant", "MDTanh": "md-tanh", "MDSoftmax": "md-softmax", "AskewSGD": "askewsgd",
                "QNNADMM": "qnn-admm"}


@dataclass(frozen=True, eq=False)
class Config:
    method: str
    spec: QuantSpec

    def __eq__(self, other: object) -> bool:
        """The same request: the same method, code sets and hyperparameters once defaults are filled in."""
        return isinstance(other, Config) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        methods.check(self.method, self.spec)  # the one validation of a request
        # from here on the hyperparameters travel typed: each back-end's `spec.resolve(Params)` returns them as they are
        object.__setattr__(self, "spec", dataclasses.replace(self.spec, params=self.params))

    @property
    def params(self) -> Any:
        """The method's typed hyperparameters (defaults with this request's overrides)."""
        return self.spec.resolve(methods.get_method(self.method).Params)

    def replace(self, **changes: Any) -> "Config":
        """The same request with some of its spec's fields changed (checked again)."""
        return Config(self.method, dataclasses.replace(self.spec, **changes))

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "params": dataclasses.asdict(self.params), "spec": self.spec.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Config":
        if not isinstance(d, dict) or not isinstance(d.get("method"), str) or not isinstance(d.get("spec"), dict):
            raise UserError("a request needs {'method': name, 'spec': {...}} (and optionally 'params')")
        return cls(d["method"], QuantSpec.from_json(d["spec"], d.get("params")))


def config(method: str, **kw: Any) -> Config:
    """A Config for `method` from keywords: QuantSpec fields (bits, per_channel, layer_bits, ...) go
    to the spec, the rest are the method's hyperparameters (`params=` may also give them as a dict
    or its Params dataclass)."""
    params = kw.pop("params", None) or {}
    if dataclasses.is_dataclass(params):
        params = dataclasses.asdict(params)
    spec_kw = {k: kw.pop(k) for k in list(kw) if k in SPEC_FIELDS}
    return Config(method, QuantSpec(**spec_kw, params={**params, **kw}))


def constructor(name: str):
    """`qexport.<name>`: the Config constructor of one back-end."""
    fn = partial(config, CONSTRUCTORS[name])
    fn.__doc__ = f"Config for {CONSTRUCTORS[name]!r}: {config.__doc__}"
    return fn
