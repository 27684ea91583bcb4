"""The registry of quantization back-ends.

Every back-end is one module here with a `Params` dataclass (its hyperparameters and their
defaults), one function with one signature,

    quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult

and `METHOD = Method(name, quantize, Params, __doc__, ...flags)` (`method.py`): the registry below is
built from those by plain imports. `model` is the trained float model (the back-end may modify a
copy, never the caller's object); `spec.resolve(Params)` gives the hyperparameters with the user's
overrides. A method whose result leaves BatchNorm statistics stale (it never trains them, or trains
them on weights other than the final codes) sets `recalibrate=True`: BatchNorm re-estimation then
runs after it by default (`qadmm.recalibrate`; `spec.bn_reestimate` overrides); `bias_correction=True`
makes bias correction its default (`spec.bias_correction` overrides). A training method also gives
its `hooks` (`qadmm.finetune.Hooks`), and then trains in the user's own loop too (`qadmm.qat`). A
back-end that walks the layers (`qadmm.layerwise`) gives its `layer_solver`, so that sensitivity
analysis and mixed precision measure each layer as that back-end would round it.
"""
from __future__ import annotations

from torch import nn

from qadmm.data import Dataset
from qadmm.errors import UserError
from qadmm.methods import admmq, askewsgd, gptq, ldnq, lq, md_softmax, md_tanh, proxquant, ptq, qnn_admm, ste
from qadmm.methods.method import Method
from qadmm.recalibrate import batchnorms, recalibrate
from qadmm.spec import QuantResult, QuantSpec

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (ptq, ste, admmq, proxquant, md_tanh, md_softmax, askewsgd,
                                                                   qnn_admm, lq, gptq, ldnq)}


def calibration_only(name: str) -> bool:
    """Whether the method needs only inputs (no labels)."""
    return get_method(name).calibration_only


def layer_solver(name: str, spec: QuantSpec):
    """The method's per-layer solver for `spec` (`qadmm.layerwise.Solver`), or None: a method that does
    not walk the layers one at a time (ptq rounds each to its nearest fit; the others train)."""
    make = get_method(name).layer_solver
    return None if make is None else make(spec)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def check(name: str, spec: QuantSpec) -> None:
    """Refuse a bad request before any work: unknown method, code sets, hyperparameters, device.
    (Layer patterns need the model: `qadmm.layers.select_layers` checks them.)"""
    spec.validate()
    spec.resolve(get_method(name).Params)
    if spec.calib_samples < 1:
        raise UserError(f"--calib-samples must be at least 1, got {spec.calib_samples}")
    if spec.device != "cpu":
        import torch

        try:
            torch.empty(0, device=spec.device)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"device {spec.device!r} is not available here ({str(e).splitlines()[0]}): use --device cpu") from None


def quantize(name: str, model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    """Check the request, run back-end `name` on a trained float model, then the recalibration it asks
    for (see above)."""
    check(name, spec)
    return run(name, model, data, spec)


def run(name: str, model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    """`quantize` for a request already checked (`qexport.config.Config` checks it when it is made)."""
    return finish(name, model, get_method(name).quantize(model, data, spec), data, spec)


def finish(name: str, model: nn.Module, result: QuantResult, data: Dataset, spec: QuantSpec) -> QuantResult:
    """A back-end's result on the CPU, recalibrated as the method asks (see above); `model` is the float one."""
    method = get_method(name)
    result.model.cpu()  # a back-end may have run on spec.device; results live on the CPU
    for lc in result.layers.values():
        lc.q, lc.alpha = lc.q.cpu(), lc.alpha.cpu()
    bn = method.recalibrate if spec.bn_reestimate is None else spec.bn_reestimate
    bn = bn and bool(batchnorms(result.model))
    bias = method.bias_correction if spec.bias_correction is None else spec.bias_correction
    if bn or bias:
        modules = dict(model.named_modules())
        float_weights = {n: modules[n].weight.detach() for n in result.layers}
        result.recalibration = recalibrate(result.model, float_weights, data.calibration(spec.calib_samples, spec.seed),
                                           bn=bn, bias=bias)
    result.model.eval()
    return result
