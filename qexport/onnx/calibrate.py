"""Activation ranges for the integer forms: uint8 scale and zero point of every quantized value.

The float model (W = α·Q, float activations) runs on training batches; for every value the
integer graph holds in uint8 (the normalised input, each linear/conv/add/pool output) we collect a
range [lo, hi] by min-max or by a percentile of each batch (averaged over batches, which clips
rare outliers), then make it contain 0 and map it onto 0..255 as onnxruntime's quantizer does:
scale = (hi - lo)/255 in float32, zero point = round_half_even(-lo/scale). A value after a folded
ReLU has lo = 0, so its zero point is 0 and the uint8 clamp at 0 *is* the ReLU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from qadmm.errors import UserError
from qexport.graph import apply_op
from qexport.ops.integer import QParams
from qexport.onnx.integer_graph import reads_input
from qexport.ops import KINDS
from qexport.ops.base import INPUT, Op

RANGES = ("minmax", "percentile")


@dataclass
class CalibConfig:
    method: str = "minmax"
    percentile: float = 99.99  # for method="percentile": keep this share of each batch's values
    num_batches: int = 8
    batch_size: int = 64
    seed: int = 0

    def describe(self) -> dict:
        return {"method": self.method, "percentile": self.percentile if self.method == "percentile" else None,
                "num_batches": self.num_batches, "batch_size": self.batch_size, "seed": self.seed}


def qparams_from_range(lo: float, hi: float) -> QParams:
    """uint8 asymmetric parameters for [lo, hi] widened to contain 0 (ORT quant_utils convention)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    if not np.isfinite(scale) or scale <= 0:
        scale = np.float32(1.0)  # constant-zero value: any scale represents it exactly
    zp = np.clip(np.round(np.float32(-lo) / scale), 0, 255)
    return QParams(scale, np.uint8(zp))


def quantized_values(ops: list[Op]) -> list[str]:
    """The values an integer graph holds in uint8 with their own calibrated parameters (a
    pass-through op's value shares its input's)."""
    raw = [INPUT] if reads_input(ops) else []
    return raw + [op.out for op in ops if not KINDS[op.kind].pass_through]


@torch.no_grad()
def values(ops: list[Op], x: torch.Tensor, wanted: set[str]):
    """(value, tensor) for each wanted value as the float graph computes it on x, each freed after
    its last reader (a large graph's values would not all fit in memory at once)."""
    vals = {INPUT: x}
    last = {v: k for k, op in enumerate(ops) for v in op.inputs}
    if INPUT in wanted:
        yield INPUT, x
    for k, op in enumerate(ops):
        vals[op.out] = apply_op(op, [vals[i] for i in op.inputs])
        if op.out in wanted:
            yield op.out, vals[op.out]
        for i in set(op.inputs):
            if last.get(i) == k:
                vals.pop(i, None)


def calibrate(ops: list[Op], x_train: np.ndarray, cfg: CalibConfig, progress: bool = True) -> dict[str, QParams]:
    """QParams for every value of `ops` (pass-through values share their input's)."""
    if cfg.method not in RANGES:
        raise UserError(f"unknown calibration method {cfg.method!r}: use one of {', '.join(RANGES)}")
    if not 50.0 < cfg.percentile <= 100.0:
        raise UserError(f"--percentile must be in (50, 100], got {cfg.percentile}")
    if len(x_train) == 0:
        raise UserError("calibration needs training samples, the training split is empty")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(x_train))
    n_batches = max(1, min(cfg.num_batches, -(-len(x_train) // cfg.batch_size)))
    wanted = quantized_values(ops)
    lo = {v: [] for v in wanted}
    hi = {v: [] for v in wanted}
    q = cfg.percentile / 100.0
    for i in tqdm(range(n_batches), desc="calibrate", disable=not progress, leave=False):
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        for v, value in values(ops, torch.as_tensor(x_train[idx]), set(wanted)):
            t = value.detach().flatten().to(torch.float64).numpy()
            if cfg.method == "minmax":
                lo[v].append(t.min())
                hi[v].append(t.max())
            else:
                lo[v].append(np.quantile(t, 1.0 - q))
                hi[v].append(np.quantile(t, q))
    out: dict[str, QParams] = {}
    agg_lo, agg_hi = (min, max) if cfg.method == "minmax" else (np.mean, np.mean)
    if INPUT in lo:
        out[INPUT] = qparams_from_range(agg_lo(lo[INPUT]), agg_hi(hi[INPUT]))
    for op in ops:
        if KINDS[op.kind].pass_through:
            out[op.out] = out[op.inputs[0]]
        else:
            lo_v = 0.0 if op.relu or KINDS[op.kind].nonnegative else agg_lo(lo[op.out])
            out[op.out] = KINDS[op.kind].calibrated(op, qparams_from_range(lo_v, agg_hi(hi[op.out])), lo_v)
    return out
