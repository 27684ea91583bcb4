"""LDNQ: layerwise ADMM on each layer's output reconstruction, with limited data (Chen, Wang, Pan, AAAI 2019).

Layers in forward order, each with inputs from the already-quantized network before it (H = XᵀX/n on
`calib_samples` training images, convs unfolded; a grouped conv has one H block per group, and every
product with H below is then taken group by group). Per layer, with W₀ the float weights (out × d rows):

    min_W  tr((W − W₀) H (W − W₀)ᵀ)   s.t.  W ∈ α·C                        (paper eq. 3)

split as W = G, G ∈ α·C, with the scaled dual Λ (algorithms.md §6):
  - W-step, closed form because the objective is quadratic:  W = (W₀H + ρ(G − Λ)) (H + ρI)⁻¹
    (one Cholesky factorisation per ρ);
  - G-step: the alternating α/Q fit of W + Λ (`codes.fit`, warm-started α);
  - dual step: Λ ← Λ + W − G;  ρ ← ρ·`rho_growth`.
The G with the lowest output error is kept; the loop stops after `patience` rounds without
improvement or `iters` rounds. ρ starts at `rho`·mean(diag H) (the paper uses H₀₀; the mean does not
depend on which input comes first). G⁰ is the nearest-rounding fit (the paper), or GPTQ's solution
with `warm_start=gptq`. With `gptq_candidate` (default) GPTQ's solution is also a candidate for the
kept G, so LDNQ's output error is never above GPTQ's: on a small CNN the ADMM wins on some layers
(1-bit: 0.16 vs 0.21 relative output error on the first conv) and GPTQ on others.

Cascade retraining (optional, `cascade_epochs` > 0): after each layer is fixed, the float parameters
after it (and its bias, BatchNorm included) are trained on the same calibration images to match the
float teacher's logits (MSE, SGD momentum 0.9, as in the paper), so later layers absorb the error.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from qadmm.codes import CodeSet, Fit, fit
from qadmm.data import Dataset
from qadmm.errors import UserError
from qadmm.layer_inputs import times_hessian
from qadmm.layers import stage
from qadmm.layerwise import Solver, output_error, walk
from qadmm.methods.gptq import GPTQ, refit_alpha
from qadmm.methods.gptq import Params as GPTQParams
from qadmm.methods.method import Method
from qadmm.spec import QuantResult, QuantSpec
from qadmm.train import check_loss, predict, seed_everything



@dataclass
class Params:
    POSITIVE: ClassVar[tuple[str, ...]] = ("iters", "rho", "rho_growth", "batch_size")  # meaningless at 0: step sizes, penalties, counts
    iters: int = 100  # ADMM rounds per layer (cap)
    patience: int = 3  # stop after this many rounds without a better G (the paper's rule)
    rho: float = 1.0  # ρ⁰ = rho·mean(diag H)
    rho_growth: float = 1.0  # ρ ← ρ·growth each round; fixed ρ (the paper's) measured best on digits cnn-small
    warm_start: str = "nearest"  # G⁰: "nearest" (the paper) or "gptq" (measured: ADMM rarely leaves it, see docs)
    gptq_candidate: bool = True  # GPTQ's solution competes with the ADMM rounds; the lower output error is kept
    refit_scale: bool = True  # refit the kept G's α in the H-norm (as gptq does)
    cascade_epochs: float = 0.0  # passes over the calibration images retraining the later layers (0: off)
    cascade_lr: float = 1e-3
    batch_size: int = 64  # cascade minibatch
    bn_each_layer: bool = True  # re-estimate BatchNorm after each layer (see gptq)
    bn_samples: int = 512  # ... on this many of the calibration images (the final re-estimation uses all)

    def __post_init__(self) -> None:  # bad values are refused when the spec is resolved, before any work
        if self.iters < 0 or self.patience < 1 or self.rho <= 0 or self.rho_growth < 1 or self.cascade_epochs < 0:
            raise UserError("ldnq: need iters >= 0, patience >= 1, rho > 0, rho_growth >= 1, cascade_epochs >= 0")
        if self.warm_start not in ("nearest", "gptq"):
            raise UserError(f"ldnq: warm_start={self.warm_start!r}: use nearest or gptq")


def solve_rows(b: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """X with X·A = B for A = L·Lᵀ symmetric: one A (d, d), or one per group of rows (g, d, d)."""
    if lo.dim() == 2:
        return torch.cholesky_solve(b.T, lo).T
    bt = b.reshape(len(lo), -1, b.shape[1]).transpose(1, 2)  # (g, d, rows per group)
    return torch.cholesky_solve(bt, lo).transpose(1, 2).reshape(b.shape)


def admm_layer(w0: torch.Tensor, h: torch.Tensor, codes: CodeSet, per_channel: bool, p: Params,
               nearest: Fit | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ADMM for one layer (W₀ (out, d) and H (d, d), or (groups, d, d) per group, float64). Returns
    the best codes, α and a log. `nearest`, when given, is the α/Q fit of W₀ (not computed again)."""
    w0, h = w0.double(), h.double()
    mean_diag = float(torch.diagonal(h, dim1=-2, dim2=-1).mean()) or 1.0
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    def dequant(q: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return q * (alpha[:, None] if per_channel else alpha)

    nearest = nearest if nearest is not None else fit(w0, codes, per_channel)
    gptq = GPTQ(w0, h).quantize(codes, per_channel, GPTQParams(), nearest) if p.warm_start == "gptq" or p.gptq_candidate else None
    if p.warm_start == "gptq":
        q, alpha = gptq
    else:
        q, alpha = nearest.q.double().reshape(w0.shape), nearest.alpha.double().reshape(-1)
    g = dequant(q, alpha)
    best = (output_error(g - w0, h), q, alpha)
    start_err = best[0]
    lam = torch.zeros_like(w0)
    rho = p.rho * mean_diag
    hw0 = times_hessian(w0, h)
    stall, rounds, lo, lo_rho = 0, 0, None, None
    for k in range(1, p.iters + 1):
        rounds = k
        if rho != lo_rho:  # one factorisation per ρ
            lo, lo_rho = torch.linalg.cholesky(h + rho * eye), rho
        # W-step: W (H + ρI) = W₀H + ρ(G − Λ)
        w = solve_rows(hw0 + rho * (g - lam), lo)
        f = fit(w + lam, codes, per_channel, alpha0=alpha.float(), max_iter=10)  # G-step
        q, alpha = f.q.double().reshape(w0.shape), f.alpha.double().reshape(-1)
        g = dequant(q, alpha)
        lam += w - g  # dual step (scaled form)
        err = output_error(g - w0, h)
        if err < best[0] * (1 - 1e-9):
            best, stall = (err, q, alpha), 0
        else:
            stall += 1
            if stall >= p.patience:
                break
        rho *= p.rho_growth
    won = "admm"
    if gptq is not None and output_error(dequant(*gptq) - w0, h) < best[0]:
        best, won = (output_error(dequant(*gptq) - w0, h), *gptq), "gptq"
    err, q, alpha = best
    if p.refit_scale:
        alpha = refit_alpha(w0, q, h, per_channel, alpha)
        err = output_error(dequant(q, alpha) - w0, h)
    return q, alpha, {"rounds": rounds, "err_start": start_err, "err_best": err, "kept": won}


def cascade(model: nn.Module, teacher_logits: torch.Tensor, x: torch.Tensor, name: str, p: Params,
            gen: torch.Generator) -> float:
    """Train the float parameters after layer `name` to the float teacher's logits (MSE). Returns the last loss."""
    st = stage(model, name)
    if not st.later:
        return float("nan")
    own = set(map(id, st.later))
    for prm in model.parameters():
        prm.requires_grad_(id(prm) in own)
    opt = torch.optim.SGD(st.later, lr=p.cascade_lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for m in st.frozen_modules:
        m.eval()
    steps = max(1, round(p.cascade_epochs * -(-len(x) // p.batch_size)))
    loss_v, done = float("nan"), 0
    while done < steps:
        for idx in torch.randperm(len(x), generator=gen).split(p.batch_size):
            loss = nn.functional.mse_loss(model(x[idx]), teacher_logits[idx])
            opt.zero_grad(set_to_none=True)
            check_loss(loss, "LDNQ's cascade retraining")
            loss.backward()
            opt.step()
            loss_v, done = float(loss.detach()), done + 1
            if done >= steps:
                break
    for prm in model.parameters():
        prm.requires_grad_(True)
    model.eval()
    return loss_v


def layer_solver(spec: QuantSpec) -> Solver:
    """One layer's codes and scales from its weight and input Hessian, as the walk asks (`layerwise.Solver`)."""
    p = spec.resolve(Params)

    def solve(w: torch.Tensor, h: torch.Tensor, codes: CodeSet, nearest: Fit):
        q, alpha, log = admm_layer(w, h, codes, spec.per_channel, p, nearest)
        base = max(output_error(w, h), 1e-30)
        return q, alpha, {"rounds": log["rounds"], "out_err_admm_start": log["err_start"] / base, "kept": log["kept"]}

    return solve


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    p = spec.resolve(Params)
    gen = seed_everything(spec.seed)
    model = copy.deepcopy(model).eval()
    x = data.calibration(spec.calib_samples, spec.seed)
    teacher = predict(model, x) if p.cascade_epochs > 0 else None

    def after(name: str) -> dict:
        return {} if teacher is None else {"cascade_loss": cascade(model, teacher, x, name, p, gen)}

    layers, history = walk(model, x, spec, layer_solver(spec), f"ldnq {spec.describe_codes()}", p.bn_each_layer, p.bn_samples, after)
    return QuantResult(model, layers, "ldnq", asdict(p), history)


METHOD = Method("ldnq", quantize, Params, __doc__, layer_solver=layer_solver,
                calibration_only=True,  # inputs only: unlabelled data will do
                recalibrate=True,  # the cascade may move BatchNorm a little, never onto the quantized statistics
                bias_correction=True)  # as for gptq (docs/calibration.md)
