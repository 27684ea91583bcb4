"""AskewSGD (Leconte, Schechtman, Moulines, AISTATS 2023): training under the constraint that every
weight lies in an ε-neighbourhood of the grid, g_ε(u) = ε − (u − a)²(u − b)² ≥ 0 in grid units
(a, b the two levels around u), with ε annealed towards 0 (algorithms.md §3).

Per coordinate the step direction is −∇f where the weight is feasible (or exactly on a level, or
where −∇f already restores feasibility faster than the rule asks), and otherwise the "skewed"
direction K = −rate·g/g′ that moves it back into the band. The grid is our code set's levels; each
layer's scale s is the warm start's fitted α (per tensor or per channel), fixed during training (the
paper freezes it once annealing starts); K is clipped so no step exceeds a quarter grid cell; ε
stays at its start value for `constant_share` of the run's steps, then shrinks geometrically to
`eps_end` at the last step (per step, so a 1-epoch budget anneals too); the final codes are the hard projection through `codes.fit`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qadmm.data import Dataset
from qadmm.errors import UserError
from qadmm.finetune import Hooks, Projector, train
from qadmm.methods.method import Method
from qadmm.spec import QuantResult, QuantSpec




@dataclass
class Params:
    POSITIVE: ClassVar[tuple[str, ...]] = ("epochs", "lr", "grid_lr", "batch_size")  # meaningless at 0: step sizes, penalties, counts
    epochs: int = 30
    lr: float = 1e-3  # Adam on the float parameters (biases, BatchNorm)
    grid_lr: float = 1e-2  # Adam on the quantized weights, in grid units (a level step is 1; binary's is 2)
    batch_size: int = 32
    rate: float = 1.0  # α of the paper: how fast an infeasible weight is sent back (K = −rate·g/g′)
    eps0: float = 1.0  # ε at the start, as a share of the largest g-value between two levels: 1 = all feasible
    eps_end: float = 1e-4  # ... and at the last epoch
    constant_share: float = 0.3  # share of the steps at eps0 before the annealing

    def __post_init__(self) -> None:
        if not 0 < self.eps_end < self.eps0 or not 0 <= self.constant_share < 1:
            raise UserError(f"askewsgd: need 0 < eps_end < eps0 and 0 <= constant_share < 1, got eps_end={self.eps_end}, "
                            f"eps0={self.eps0}, constant_share={self.constant_share}")


def neighbours(u: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two consecutive levels a < b around each entry of u (the outermost pair beyond the ends)."""
    i = torch.searchsorted(levels, u.contiguous()).clamp(1, len(levels) - 1)
    return levels[i - 1], levels[i]


def direction(u: torch.Tensor, grad: torch.Tensor, levels: torch.Tensor, eps: float, rate: float,
              clip: float) -> torch.Tensor:
    """The step direction d of AskewSGD for weights u (grid units) with loss gradient `grad`:
    −grad where g(u) ≥ 0, u is on a level or −grad·K > K²; else K = −rate·g/g′ clipped to ±clip."""
    a, b = neighbours(u, levels)
    g = eps - (u - a) ** 2 * (u - b) ** 2
    dg = -2 * (u - a) * (u - b) * (2 * u - a - b)
    dg = torch.where(dg.abs() < 1e-6, torch.where(dg < 0, -1e-6, 1e-6), dg)  # g′ = 0 at levels and midpoints
    k = (-rate * g / dg).clamp(-clip, clip)
    on_level = (u == a) | (u == b)
    keep = (g >= 0) | on_level | (-grad * k > k * k)
    return torch.where(keep, -grad, k)


def hooks(model: nn.Module, spec: QuantSpec, p: Params, proj: Projector) -> Hooks:
    weights = proj.weights
    scale, levels, u, eps_max = {}, {}, {}, {}
    for n in proj.names:
        w, a = weights[n], proj.alphas[n]
        scale[n] = a.reshape(-1, *([1] * (w.dim() - 1))) if a.dim() == 1 else a
        levels[n] = torch.tensor(proj.codes[n].levels, dtype=torch.float32, device=w.device)
        eps_max[n] = float(((levels[n][1] - levels[n][0]) / 2) ** 4)  # g's largest value between two levels
        u[n] = nn.Parameter((w.detach() / scale[n]).clamp(levels[n][0], levels[n][-1]))  # in grid units
        w.requires_grad_(False)

    def eps(t: float) -> float:  # ε share at run share t: constant, then geometric to eps_end at the last step
        if t <= p.constant_share:
            return p.eps0
        return p.eps0 * (p.eps_end / p.eps0) ** ((t - p.constant_share) / (1 - p.constant_share))

    def before_step(t: float) -> None:  # the skewed direction replaces the gradient (the optimiser steps along −grad)
        for n in proj.names:
            d = direction(u[n].detach(), u[n].grad, levels[n], eps(t) * eps_max[n], p.rate, clip=0.25 / p.grid_lr)
            u[n].grad = -d

    def after_step(t: float) -> None:
        with torch.no_grad():
            for n in proj.names:
                u[n].clamp_(levels[n][0], levels[n][-1])
                weights[n].copy_(scale[n] * u[n])

    def report() -> dict:
        feasible = sum(int((eps(1.0) * eps_max[n] - (u[n] - a) ** 2 * (u[n] - b) ** 2 >= 0).sum())
                       for n in proj.names for a, b in [neighbours(u[n].detach(), levels[n])])
        return {"feasible_fraction_at_end": feasible / sum(x.numel() for x in u.values())}

    return Hooks(weight=lambda n, w: scale[n] * u[n], before_step=before_step, after_step=after_step,
                 extra=u, extra_lr=p.grid_lr, report=report)


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    return train("askewsgd", hooks, Params, model, data, spec)


METHOD = Method("askewsgd", quantize, Params, __doc__,
                recalibrate=True,  # BatchNorm's running statistics were gathered on weights before the final hard rounding: re-estimate them on α·Q
                hooks=hooks)
