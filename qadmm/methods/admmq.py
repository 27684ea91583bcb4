"""ADMM-Q (Huang et al., AISTATS 2021): whole-network ADMM with a float copy W, a quantized copy
G = α·Q and a multiplier λ per quantized weight. The W-step is inexact: Adam steps on
CE + ρ/2‖W − G + λ/ρ‖²; `updates` times, evenly over the run's steps, G ← Π(W + λ/ρ) (alternating
α/Q fit) and λ ← λ + ρ(W − G) (algorithms.md §1). ρ grows geometrically to `rho_end` at the last
update, so W is driven onto the code set whatever the budget (a 1-epoch run gets all its updates).

The paper's two variants of the G-step: soft projection (ADMM-S, `soft` = β > 0) moves
z = W + λ/ρ towards its projection by at most β (the norm over the whole layer), and random
projection (ADMM-R, `random` = p in (0, 1]) re-projects each entry with probability p and leaves the
others at their previous value. The final codes are the hard projection through `codes.fit`."""
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
    POSITIVE: ClassVar[tuple[str, ...]] = ("epochs", "lr", "batch_size", "rho", "rho_end", "updates")  # meaningless at 0: step sizes, penalties, counts
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 32
    # ρ multiplies a sum over weights next to a batch-mean loss. Measured on digits, 1 bit, 30 epochs:
    # (ρ, growth per epoch) = (1e-3, 2.0) 93.9%, (1e-1, 1.3) 93.3%, (1e-2, 1.3) 92.5%, (1e-2, 2.0) 92.5%.
    rho: float = 1e-3
    # ρ grows geometrically from `rho` to `rho_end` at the last G/λ update, whatever the run length
    # (a fixed ×2 per epoch left 5-epoch MNIST runs at ρ = 0.03, far from the grid: 44.7% at 1 bit).
    rho_end: float = 1e-3 * 2**29  # what ×2 per epoch reached in 30 epochs (the measured default above)
    # G/λ updates over the run, evenly spaced in steps: one per epoch at the default 30 epochs (the
    # paper's "inexact but long" W-step). Per epoch, a 1-epoch CNN budget had one update at ρ = rho:
    # W never neared the grid (10% on it) and the hard rounding cost 66 points (20.8% on cnn-small, 2 bits).
    updates: int = 30
    soft: float = 0.0  # ADMM-S: > 0 moves G at most this far (Euclidean, per layer) towards the projection
    random: float = 0.0  # ADMM-R: in (0, 1], the share of entries re-projected at each G-step (0: all)

    def __post_init__(self) -> None:
        if not 0 <= self.random <= 1:
            raise UserError(f"admm-q: random={self.random} is a probability: use a value in (0, 1] (0 turns it off)")


def soft_step(z: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """z moved towards `target` by at most β in Euclidean norm (ADMM-S's soft projection)."""
    gap = target - z
    dist = float(gap.norm())
    return target if dist <= beta else z + beta / dist * gap


def random_step(old: torch.Tensor, new: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Each entry takes `new` with probability p, else keeps `old` (ADMM-R's random projection)."""
    mask = torch.rand(old.shape, generator=gen, device="cpu").to(old.device) < p
    return torch.where(mask, new, old)


def hooks(model: nn.Module, spec: QuantSpec, p: Params, proj: Projector) -> Hooks:
    weights = proj.weights
    G = {n: lc.weight() for n, lc in proj().items()}
    lam = {n: torch.zeros_like(w) for n, w in weights.items()}
    rho, done = [p.rho], [0]
    growth = (p.rho_end / p.rho) ** (1 / max(p.updates - 1, 1)) if p.rho_end > p.rho else 1.0
    gen = torch.Generator().manual_seed(spec.seed + 11)  # ADMM-R's masks

    def penalty() -> torch.Tensor:  # ρ/2‖W − G + λ/ρ‖²
        return sum(rho[0] / 2 * ((w - G[n] + lam[n] / rho[0]) ** 2).sum() for n, w in weights.items())

    def after_step(t: float) -> None:
        k = int(t * p.updates + 1e-9)  # the evenly spaced updates due by now (a run shorter than `updates` steps skips some)
        if k <= done[0]:
            return
        done[0] = k
        rho[0] = p.rho * growth ** (k - 1)  # update k's ρ: rho_end at the last one whatever the run length
        with torch.no_grad():
            shifted = {n: w + lam[n] / rho[0] for n, w in weights.items()}
            for n, lc in proj(shifted).items():  # G-step: project W + λ/ρ
                g = lc.weight()
                if p.soft > 0:
                    g = soft_step(shifted[n], g, p.soft)
                if p.random > 0:
                    g = random_step(G[n], g, p.random, gen)
                G[n] = g
                lam[n] += rho[0] * (weights[n] - G[n])  # dual step
        rho[0] *= growth  # the W-steps until the next update

    return Hooks(loss_extra=penalty, after_step=after_step, summary=lambda: {"final_rho": p.rho * growth ** (done[0] - 1)})


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    return train("admm-q", hooks, Params, model, data, spec)


METHOD = Method("admm-q", quantize, Params, __doc__,
                recalibrate=True,  # BatchNorm's running statistics were gathered on weights before the final hard rounding: re-estimate them on α·Q
                hooks=hooks)
