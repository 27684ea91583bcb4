"""Mirror Descent for quantization (Ajanthan et al., AISTATS 2021), the numerically stable "-S"
forms shared by `md-tanh` and `md-softmax` (algorithms.md §2).

Each quantized layer keeps an unconstrained auxiliary tensor ũ in grid units; the forward pass uses
W = α·P_β(ũ) and the gradient with respect to P_β(ũ) is applied to ũ directly (no tanh′ / softmax
Jacobian: with it the method is GD-tanh, whose gradient vanishes as β grows). β grows
geometrically from `beta0` to `beta_end` over the run's steps, so the projection ends hard whatever
the run length (the paper's per-iteration schedule is for 100k iterations). Differences from the
paper, chosen for a toolkit that warm-starts and exports integer codes:

- Warm start: ũ starts where P_β0(ũ) reproduces the float weights (clamped into the code range), α
  is the warm start's fitted scale (per tensor or per channel) and stays fixed while training.
- Beyond binary: `tanh` is the staircase Σ_j Δ_j·σ_β(ũ − t_j) over the code set's levels (t_j the
  midpoints, Δ_j the steps; binary gives tanh(βũ), ternary the paper's ½[tanh(β(ũ+½)) + tanh(β(ũ−½))]);
  `softmax` is over all of the code set's levels per weight (the paper's code is binary only), which
  costs one value per level per weight: 255 at 8 bits.
- The final codes are the hard projection of α·P_β(ũ) through `codes.fit`, like every back-end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar
from functools import partial

import torch
from torch import nn

from qadmm.data import Dataset
from qadmm.errors import UserError
from qadmm.finetune import Hooks, Projector, train
from qadmm.spec import QuantResult, QuantSpec



@dataclass
class Params:
    POSITIVE: ClassVar[tuple[str, ...]] = ("epochs", "lr", "batch_size")  # meaningless at 0: step sizes, penalties, counts
    epochs: int = 30
    lr: float = 1e-3  # Adam on ũ (grid units) and on the float parameters
    batch_size: int = 32
    beta0: float = 1.0  # β at the first step
    beta_end: float = 1e3  # β at the last step (the paper's runs end near 1e3-1e4)

    def __post_init__(self) -> None:
        if not 0 < self.beta0 < self.beta_end:
            raise UserError(f"md: need 0 < beta0 < beta_end, got beta0={self.beta0}, beta_end={self.beta_end}")


def _levels(codes, device) -> torch.Tensor:
    return torch.tensor(codes.levels, dtype=torch.float32, device=device)


def staircase(u: torch.Tensor, levels: torch.Tensor, beta: float) -> torch.Tensor:
    """P_β for `tanh`: l_0 + Σ_j d·σ(β(u − t_j)) over the steps j between equally spaced levels
    (spacing d, midpoints t_j), σ(z) = (1 + tanh z)/2; it tends to rounding onto the levels as β → ∞.
    Only the steps within 16/β of u are evaluated: beyond, σ is exactly 0 or 1 in float32, so the
    cost is O(1 + 1/β) per weight instead of one tanh per level (254 at 8 bits)."""
    d, steps = float(levels[1] - levels[0]), len(levels) - 1
    t0 = float(levels[0]) + d / 2
    r = math.ceil(16 / (beta * d))
    if 2 * r + 1 >= steps:  # the window would hold every step anyway
        return levels[0] + d * ((1 + torch.tanh(beta * (u.unsqueeze(-1) - (t0 + d * torch.arange(steps, device=u.device))))) / 2).sum(-1)
    c = torch.round((u - t0) / d)  # the step nearest to u
    j = c.unsqueeze(-1) + torch.arange(-r, r + 1, device=u.device, dtype=u.dtype)
    near = (1 + torch.tanh(beta * (u.unsqueeze(-1) - (t0 + j * d)))) / 2
    part = torch.where((j >= 0) & (j < steps), near, torch.zeros_like(near)).sum(-1)
    return levels[0] + d * ((c - r).clamp(0, steps) + part)  # every step below the window is a full step


def softmax_weights(u: torch.Tensor, levels: torch.Tensor, beta: float) -> torch.Tensor:
    """P_β for `softmax`: Σ_λ softmax(βũ)_λ·q_λ over the last axis (one ũ per level)."""
    return (torch.softmax(beta * u, dim=-1) * levels).sum(-1)


class Mirror:
    """One layer's mirror map: the auxiliary ũ, its initialisation and P_β with the "-S" gradient."""

    def __init__(self, kind: str, w: torch.Tensor, alpha: torch.Tensor, codes, beta0: float):
        self.kind, self.levels = kind, _levels(codes, w.device)
        self.alpha = alpha.reshape(-1, *([1] * (w.dim() - 1))) if alpha.dim() == 1 else alpha
        x = (w.detach() / self.alpha).clamp(self.levels[0] + 0.01, self.levels[-1] - 0.01)
        if kind == "tanh":  # P_β0(ũ) = x by bisection: the staircase is increasing in ũ
            lo, hi = torch.full_like(x, float(self.levels[0]) - 50), torch.full_like(x, float(self.levels[-1]) + 50)
            for _ in range(60):
                mid = (lo + hi) / 2
                below = staircase(mid, self.levels, beta0) < x
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            u = (lo + hi) / 2
        else:  # mass on the levels nearest x: the argmax is x's nearest level, as rounding would pick
            u = -((x.unsqueeze(-1) - self.levels) ** 2)
        self.u = nn.Parameter(u.clone())  # a parameter: an optimiser over the model's (`qadmm.qat`) finds it

    def weight(self, beta: float) -> torch.Tensor:
        """α·P_β(ũ) with ∂/∂ũ := ∂/∂P (tanh) or ∂/∂u = ∂/∂P·q_λ (softmax): the "-S" update."""
        u = self.u
        if self.kind == "tanh":
            p = staircase(u.detach(), self.levels, beta) + (u - u.detach())
        else:
            s = torch.softmax(beta * u.detach(), dim=-1) + (u - u.detach())
            p = (s * self.levels).sum(-1)
        return self.alpha * p

    @torch.no_grad()
    def soft(self, beta: float) -> torch.Tensor:
        f = staircase if self.kind == "tanh" else softmax_weights
        return self.alpha * f(self.u, self.levels, beta)


def hooks(kind: str, model: nn.Module, spec: QuantSpec, p: Params, proj: Projector) -> Hooks:
    weights = proj.weights
    mirrors = {n: Mirror(kind, weights[n], proj.alphas[n], proj.codes[n], p.beta0) for n in proj.names}
    for n in proj.names:
        weights[n].requires_grad_(False)
    beta = [p.beta0]

    def after_step(t: float) -> None:  # β grows geometrically to beta_end at the last step; the weights follow α·P_β(ũ)
        beta[0] = p.beta0 * (p.beta_end / p.beta0) ** t
        with torch.no_grad():
            for n, m in mirrors.items():
                weights[n].copy_(m.soft(beta[0]))

    with torch.no_grad():
        for n, m in mirrors.items():  # the warm start, as P_β0 reproduces it
            weights[n].copy_(m.soft(p.beta0))
    return Hooks(weight=lambda n, w: mirrors[n].weight(beta[0]), after_step=after_step,
                 extra={n: m.u for n, m in mirrors.items()}, summary=lambda: {"final_beta": beta[0]})


def run(kind: str, name: str, model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    return train(name, partial(hooks, kind), Params, model, data, spec)
