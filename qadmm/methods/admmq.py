"""ADMM-Q (Huang et al., AISTATS 2021): whole-network ADMM with a float copy W, a quantized copy
G = α·Q and a multiplier λ per quantized weight. The W-step is inexact: epochs of Adam on
CE + ρ/2‖W − G + λ/ρ‖²; every `update_every` epochs G ← Π(W + λ/ρ) (alternating α/Q fit) and
λ ← λ + ρ(W − G) (algorithms.md §1). ρ grows geometrically so W is driven onto the code set."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from qadmm.data import Dataset
from qadmm.finetune import Projector, finetune
from qadmm.spec import QuantResult, QuantSpec


@dataclass
class Params:
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 32
    # ρ multiplies a sum over weights next to a batch-mean loss. Measured on digits, 1 bit, 30 epochs:
    # (ρ, growth) = (1e-3, 2.0) 93.9%, (1e-1, 1.3) 93.3%, (1e-2, 1.3) 92.5%, (1e-2, 2.0) 92.5%.
    rho: float = 1e-3
    rho_growth: float = 2.0  # ρ ← ρ·growth at every G/λ update
    update_every: int = 1  # epochs between G/λ updates (the "inexact but long" W-step)


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    p = spec.resolve(Params)
    model = copy.deepcopy(model).to(spec.device)
    proj = Projector(model, spec)
    weights = {n: m.weight for n, m in model.named_modules() if n in proj.names}
    G = {n: lc.weight() for n, lc in proj().items()}
    lam = {n: torch.zeros_like(w) for n, w in weights.items()}
    rho = [p.rho]

    def penalty() -> torch.Tensor:  # ρ/2‖W − G + λ/ρ‖²
        return sum(rho[0] / 2 * ((w - G[n] + lam[n] / rho[0]) ** 2).sum() for n, w in weights.items())

    def after_epoch(epoch: int) -> None:
        if epoch % p.update_every:
            return
        with torch.no_grad():
            shifted = {n: w + lam[n] / rho[0] for n, w in weights.items()}
            for n, lc in proj(shifted).items():  # G-step: project W + λ/ρ
                G[n] = lc.weight()
                lam[n] += rho[0] * (weights[n] - G[n])  # dual step
        rho[0] *= p.rho_growth

    qm, layers, history = finetune(model, data, spec, proj, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
                                   desc="admm-q", loss_extra=penalty, after_epoch=after_epoch)
    return QuantResult(qm, layers, "admm-q", asdict(p), history)
