"""The layer walk the calibration-only back-ends share (gptq, ldnq): a short driver around a per-layer solver.

Layers in forward order; each is solved on its input Hessian H (from the calibration images run
through the network whose earlier layers are already quantized), written as α·Q, and optionally
followed by a BatchNorm re-estimation so the next layer sees the statistics it will be deployed with.
Each layer gets its own code set (`QuantSpec.codes_for`); a grouped convolution comes with one
Hessian block per group (`layer_inputs`), which the solvers take as it is.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from qadmm.codes import ZERO_SCALE, CodeSet, Fit, fit
from qadmm.layer_inputs import input_hessian, times_hessian, weight_matrix
from qadmm.layers import select_layers
from qadmm.recalibrate import reestimate_bn
from qadmm.spec import LayerCodes, QuantSpec

# solve(W (out, d), H (d, d) or (groups, d, d), code set, nearest) -> (codes (out, d) as float integers,
# α (out,) or (1,), log); `nearest` is the α/Q fit of W the log compares with (a solver may start from it)
Solver = Callable[[torch.Tensor, torch.Tensor, CodeSet, Fit], tuple[torch.Tensor, torch.Tensor, dict]]


def output_error(dw: torch.Tensor, h: torch.Tensor, dtype: torch.dtype = torch.float64) -> float:
    """tr(ΔW H ΔWᵀ): the mean squared output error of a weight change ΔW (out, d) on inputs with H = XᵀX/n
    (summed over the groups when H holds one block per group), the products in `dtype`."""
    dw = dw.to(dtype)
    return float((times_hessian(dw, h.to(dtype)) * dw).double().sum())


def relative_output_errors(w: torch.Tensor, approx: list[torch.Tensor], h: torch.Tensor) -> list[float]:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for each approximation of W (any shape with W's rows), in float32:
    a log, not a decision (the solvers compare with the float64 `output_error`)."""
    w, h32 = w.reshape(len(w), -1).float(), h.float()
    errs = [output_error(dw, h32, torch.float32) for dw in [w, *[w - a.reshape(len(w), -1).float() for a in approx]]]
    return [e / max(errs[0], 1e-30) for e in errs[1:]]


def layer_codes(q: torch.Tensor, alpha: torch.Tensor, shape: torch.Size, codes: CodeSet, per_channel: bool) -> LayerCodes:
    """Codes from a solver (a float matrix of integers and α) in the layer's shape and storage types."""
    alpha = alpha.float().clamp_min(ZERO_SCALE)
    return LayerCodes(q.reshape(shape).to(codes.storage_dtype), alpha if per_channel else alpha.reshape(()), codes)


def walk(model: nn.Module, x: torch.Tensor, spec: QuantSpec, solve: Solver, desc: str, bn_each_layer: bool,
         bn_samples: int, after: Callable[[str], dict] | None = None) -> tuple[dict[str, LayerCodes], list[dict]]:
    """Quantize `model`'s layers in place, in forward order, with `solve`; returns the codes and a per-layer
    log (relative output errors of nearest rounding and of the solver, the solver's own log, seconds).
    `after(name)` runs once a layer is fixed (e.g. a retraining of the later layers) and adds to its log;
    it may change that layer's bias and what comes after it, never what comes before (a model that
    streams the calibration inputs through the walk, `streamed(x)`, keeps the values before)."""
    layers: dict[str, LayerCodes] = {}
    history = []
    streamed = getattr(model, "streamed", None)  # a model that runs x through once for the whole walk
    with streamed(x) if streamed is not None else nullcontext():
        todo = list(select_layers(model, spec))
        for k, (name, m) in enumerate(tqdm(todo, desc=desc, disable=not spec.progress)):
            # the BatchNorm re-estimation after this layer need only reach the next one (see reestimate_bn);
            # a step that retrains later layers (`after`) gets every BatchNorm re-estimated
            stop = todo[k + 1][1] if k + 1 < len(todo) and after is None else None
            history.append(_layer(model, name, m, x, spec, solve, layers, bn_each_layer, bn_samples, after, stop))
    return layers, history


def _layer(model: nn.Module, name: str, m: nn.Module, x: torch.Tensor, spec: QuantSpec, solve: Solver,
           layers: dict[str, LayerCodes], bn_each_layer: bool, bn_samples: int, after: Callable[[str], dict] | None,
           stop: nn.Module | None) -> dict:
    """One step of the walk: layer `name` solved, written as α·Q; its log."""
    t0 = time.perf_counter()
    codes = spec.codes_for(name)
    nearest = fit(m.weight.detach(), codes, spec.per_channel)
    w = weight_matrix(m)
    h = input_hessian(model, m, x)
    q, alpha, solver_log = solve(w, h, codes, nearest)
    layers[name] = layer_codes(q, alpha, m.weight.shape, codes, spec.per_channel)
    err_nearest, err = relative_output_errors(w, [nearest.dequantize(), layers[name].weight()], h)
    log = {"out_err_nearest": err_nearest, "out_err": err, **solver_log}
    with torch.no_grad():
        m.weight.copy_(layers[name].weight())
    if after is not None:
        log.update(after(name))
    if bn_each_layer:
        reestimate_bn(model, x[:bn_samples], stop_at=stop)
    return {"layer": name, **log, "seconds": round(time.perf_counter() - t0, 2)}
