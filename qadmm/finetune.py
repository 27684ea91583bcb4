"""The training loop the gradient-based back-ends share (STE, ADMM-Q, ProxQuant).

Each method differs only in how the forward pass sees the weights, an extra loss term, and what
happens after each optimiser step or epoch; the loop, the per-epoch projection onto the code set
and the model selection (best quantized model on validation) are common.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from qadmm.codes import CodeSet, fit
from qadmm.data import Dataset
from qadmm.layers import select_layers
from qadmm.spec import LayerCodes, QuantSpec, apply_codes
from qadmm.train import device_of, evaluate, seed_everything, train_epoch


@dataclass
class Projector:
    """Projects the selected layers of `model` onto their code sets (`QuantSpec.codes_for`),
    warm-starting each α from the previous call (the fast path of the alternating fit)."""

    model: nn.Module
    spec: QuantSpec
    names: list[str] = field(init=False)
    codes: dict[str, CodeSet] = field(init=False)
    alphas: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = [n for n, _ in select_layers(self.model, self.spec)]
        self.codes = {n: self.spec.codes_for(n) for n in self.names}
        self.modules = dict(self.model.named_modules())
        for n in self.names:  # the full multi-start fit once, then warm starts
            self.alphas[n] = fit(self.modules[n].weight.detach(), self.codes[n], self.spec.per_channel).alpha

    def __call__(self, weights: dict[str, torch.Tensor] | None = None) -> dict[str, LayerCodes]:
        out = {}
        for n in self.names:
            w = (weights or {}).get(n, self.modules[n].weight).detach()
            f = fit(w, self.codes[n], self.spec.per_channel, alpha0=self.alphas[n], max_iter=5)
            self.alphas[n] = f.alpha
            out[n] = LayerCodes(f.q, f.alpha, self.codes[n])
        return out

    def quantized_copy(self) -> tuple[nn.Module, dict[str, LayerCodes]]:
        layers = self()
        return apply_codes(copy.deepcopy(self.model), layers).eval(), layers


Hook = Callable[[int], None]


def finetune(
    model: nn.Module,
    data: Dataset,
    spec: QuantSpec,
    proj: Projector,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    desc: str,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_extra: Callable[[], torch.Tensor] | None = None,
    after_step: Hook | None = None,
    after_epoch: Hook | None = None,
) -> tuple[nn.Module, dict[str, LayerCodes], list[dict]]:
    """Adam on cross-entropy (+ loss_extra) over `model`'s trainable parameters; after every epoch
    the projected (α·Q) model is scored on validation and the best one is returned with its codes."""
    gen = seed_everything(spec.seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = (torch.as_tensor(a).to(device_of(model)) for a in (data.x_train, data.y_train))
    forward = forward or model
    best_model, best_layers = proj.quantized_copy()
    best = evaluate(best_model, data.x_val, data.y_val)
    history = [{"epoch": 0, "val_acc": best[0], "val_loss": best[1]}]
    bar = tqdm(range(1, epochs + 1), desc=desc, disable=not spec.progress, leave=False)
    for epoch in bar:
        model.train()
        train_epoch(forward, opt, x, y, batch_size, gen, loss_extra,
                    None if after_step is None else lambda: after_step(epoch))
        if after_epoch is not None:
            after_epoch(epoch)
        qm, layers = proj.quantized_copy()
        val = evaluate(qm, data.x_val, data.y_val)
        history.append({"epoch": epoch, "val_acc": val[0], "val_loss": val[1]})
        bar.set_postfix(val=f"{val[0]:.2f}%")
        if val[0] > best[0] or (val[0] == best[0] and val[1] < best[1]):
            best, best_model, best_layers = val, qm, layers
    return best_model, best_layers, history
