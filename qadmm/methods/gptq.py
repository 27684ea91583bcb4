"""GPTQ: output-aware rounding with error feedback (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023). Calibration only, no labels.

Layers in forward order; each sees its inputs X from the network whose earlier layers are already
quantized (and, by default, whose BatchNorm statistics were re-estimated after each of them). Per
layer the objective is the output error ‖(W − Ŵ)X‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ), H = XᵀX/n (paper eq. 1).
The scales α are fixed first (`codes.fit`, per channel or per tensor); then the input columns are
rounded one at a time to α·(nearest code), and each column's rounding error is pushed onto the
columns not yet rounded through the upper Cholesky factor U of H⁻¹ (eq. 2-3 and Algorithm 1):
    e = (w_j − q_j) / U_jj,   w_{j+1:} −= e · U_{j, j+1:},
updated lazily in blocks of `block_size` columns. Optionally (`act_order`) columns go in order of
decreasing H_jj. With `refit_scale` each row's α is then refit in the H-norm for the chosen codes,
α = ⟨q, H w⟩ / ⟨q, H q⟩ (the least-squares scale of the layer's output), which never increases the
output error. The code sets are this package's (binary, ternary, symmetric, thesis), one per layer
(`QuantSpec.codes_for`). A grouped convolution is solved group by group on its own Hessian block
(its rows only ever see their group's inputs), with the scales fitted over the whole layer first so
that a per-tensor α stays one α.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from scipy.linalg import lapack
from torch import nn

from qadmm.codes import CodeSet, Fit, fit
from qadmm.data import Dataset
from qadmm.errors import UserError
from qadmm.layer_inputs import times_hessian
from qadmm.layerwise import Solver, walk
from qadmm.methods.method import Method
from qadmm.spec import QuantResult, QuantSpec



@dataclass
class Params:
    POSITIVE: ClassVar[tuple[str, ...]] = ("block_size",)  # meaningless at 0: step sizes, penalties, counts
    damp: float = 0.01  # H += damp·mean(diag H)·I before inverting (the paper's 1 %)
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = False  # round columns by decreasing H_jj (helps LLMs; measured neutral on small CNNs)
    refit_scale: bool = True  # refit α in the H-norm for the chosen codes
    bn_each_layer: bool = True  # re-estimate BatchNorm after each layer, so later layers see deployed statistics
    bn_samples: int = 512  # ... on this many of the calibration images (the final re-estimation uses all)

    def __post_init__(self) -> None:  # bad values are refused when the spec is resolved, before any work
        if self.damp < 0 or self.block_size < 1:
            raise UserError("gptq: need damp >= 0 and block_size >= 1")


def refit_alpha(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, per_channel: bool, alpha: torch.Tensor) -> torch.Tensor:
    """α minimising ‖(W − α·Q)X‖² for fixed codes: per row ⟨q, Hw⟩/⟨q, Hq⟩ (summed over rows per tensor).
    Rows whose optimum is not positive keep their previous α."""
    hq = times_hessian(q, h)
    num, den = (hq * w).sum(1), (hq * q).sum(1)
    if not per_channel:
        num, den = num.sum(0, keepdim=True), den.sum(0, keepdim=True)
    new = torch.where(den > 0, num / den.clamp_min(1e-300), alpha.double().reshape(-1))
    return torch.where(new > 0, new, alpha.double().reshape(-1))


class GPTQ:
    """One layer: weight matrix W (out, d) and input Hessian H, both float64; H is (d, d), or one
    (d, d) block per group, (g, d, d), for a grouped convolution (the rows of W in g consecutive groups)."""

    def __init__(self, w: torch.Tensor, h: torch.Tensor):
        self.w0 = w.double()
        self.h = h.double()

    def hinv_factor(self, h: torch.Tensor, damp: float) -> torch.Tensor:
        """Upper Cholesky factor U of (H + λI)⁻¹ (H⁻¹ = UᵀU), damping raised tenfold until H is positive
        definite. With J the order reversal, if JHJ = LLᵀ then H⁻¹ = (J L⁻¹ J)ᵀ(J L⁻¹ J) and J L⁻¹ J is
        upper triangular: one Cholesky and one triangular inverse, half the work of inverting H and
        factoring the inverse (the same U to rounding). JMJ of a contiguous square M is its memory read
        backwards (entry (i, j) moves to d² − 1 − (i·d + j)): a reversed copy, not a strided flip."""
        mean_diag = float(torch.diagonal(h).mean()) or 1.0
        for k in range(6):
            hd = _reversed(h)  # JHJ, whose diagonal is H's reversed
            hd.diagonal().add_((damp * 10**k) * mean_diag)
            lo, info = torch.linalg.cholesky_ex(hd)
            del hd
            if int(info) == 0:  # torch's factor is column-major: LAPACK inverts it in place, without a copy
                inv, info = lapack.dtrtri(lo.numpy(), lower=1, overwrite_c=1)
                if info == 0:
                    return _reversed(torch.from_numpy(inv))
        raise RuntimeError("GPTQ: the input Hessian stays singular after damping")

    def quantize(self, codes: CodeSet, per_channel: bool, p: Params, nearest: Fit | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (out, d) as float64 integers and α (out,) or (1,). α starts from the α/Q fit of W
        (`nearest`, when given, is that fit: reused unless some input is dead, which changes W)."""
        hs = self.h if self.h.dim() == 3 else self.h[None]
        w = self.w0.clone().reshape(len(hs), -1, self.w0.shape[1])  # (groups, rows per group, d)
        dead = hs.diagonal(dim1=1, dim2=2) == 0  # inputs that are always 0: any code is exact there
        if bool(dead.any()):
            hs = hs.clone()
            hs.diagonal(dim1=1, dim2=2)[dead] = 1.0
            w.masked_fill_(dead[:, None, :], 0.0)
            nearest = None
        if nearest is None:
            nearest = fit(w.reshape(self.w0.shape), codes, per_channel)
        alpha = nearest.alpha.double().reshape(-1)
        a = alpha.expand(len(self.w0)).reshape(len(hs), -1)  # α per row
        q = torch.cat([self.round_group(w[i], hs[i], a[i], codes, p) for i in range(len(hs))])
        if p.refit_scale:
            alpha = refit_alpha(self.w0, q, self.h, per_channel, alpha)
        return q, alpha

    def round_group(self, w: torch.Tensor, h: torch.Tensor, a: torch.Tensor, codes: CodeSet, p: Params) -> torch.Tensor:
        """Algorithm 1 on rows w (r, d) sharing the Hessian h (d, d), scales a (r,) fixed: the codes (r, d).
        The weights are held transposed, (d, r), so that a column is a contiguous row; the loop over the
        columns of a block runs in NumPy (cheap calls on a few hundred values), the block updates in torch."""
        perm = torch.argsort(torch.diagonal(h), descending=True) if p.act_order else None
        if perm is not None:
            w, h = w[:, perm], h[perm][:, perm]
        u = self.hinv_factor(h, p.damp)
        wt = w.T.contiguous()  # (d, r); w is not changed
        q = torch.zeros_like(wt)
        wt_, q_, u_, a_ = wt.numpy(), q.numpy(), u.numpy(), a.contiguous().numpy()
        d = len(wt)
        for i1 in range(0, d, p.block_size):  # Algorithm 1 with lazy batch updates
            i2 = min(i1 + p.block_size, d)
            w1, u1 = wt_[i1:i2], u_[i1:i2, i1:i2]  # w1 is a view: the block is updated in place
            for j in range(i2 - i1):
                col = w1[j]
                qj = codes.project(col / a_)
                q_[i1 + j] = qj
                e = (col - a_ * qj) / u1[j, j]  # eq. 3: the error of column j, scaled by U_jj
                w1[j:] -= u1[j, j:, None] * e[None, :]  # ... spread over the block's later columns
                w1[j] = e  # column j is done: its row holds the error for the update below
            if i2 < d:  # eq. 2, lazily: the block's errors (r, B) onto the later columns
                wt[i2:] -= (wt[i1:i2].T.contiguous() @ u[i1:i2, i2:]).T
        q = q.T
        return q[:, torch.argsort(perm)] if perm is not None else q.contiguous()


def _reversed(m: torch.Tensor) -> torch.Tensor:
    """J M J for a square matrix M: a contiguous copy with rows and columns in reverse order."""
    return m.contiguous().reshape(-1).flip(0).reshape(m.shape)


def layer_solver(spec: QuantSpec) -> Solver:
    """One layer's codes and scales from its weight and input Hessian, as the walk asks (`layerwise.Solver`)."""
    p = spec.resolve(Params)

    def solve(w: torch.Tensor, h: torch.Tensor, codes: CodeSet, nearest: Fit):
        return (*GPTQ(w, h).quantize(codes, spec.per_channel, p, nearest), {})

    return solve


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    p = spec.resolve(Params)
    model = copy.deepcopy(model).eval()
    layers, history = walk(model, data.calibration(spec.calib_samples, spec.seed), spec, layer_solver(spec),
                           f"gptq {spec.describe_codes()}", p.bn_each_layer, p.bn_samples)
    return QuantResult(model, layers, "gptq", asdict(p), history)


METHOD = Method("gptq", quantize, Params, __doc__, layer_solver=layer_solver,
                calibration_only=True,  # inputs only: unlabelled data will do
                recalibrate=True,  # nothing here trains BatchNorm: re-estimate its statistics afterwards
                bias_correction=True)  # measured on cnn-small Fashion-MNIST (docs/calibration.md): +0.1 / 0 / +3.8 / +1.1 points at 4/3/2/1 bits
