"""The training loop the gradient-based back-ends share (STE, ADMM-Q, ProxQuant).

Each method differs only in how the forward pass sees the weights, an extra loss term, and what
happens after each optimiser step or epoch; the loop, the per-epoch projection onto the code set
and the model selection (best quantized model on validation) are common.
"""
from __future__ import annotations

import copy
import math
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

    def on_grid(self, layers: dict[str, LayerCodes], tol: float = 0.05) -> float:
        """The share of the layers' current float weights within `tol` of a grid step (α; 2α for
        binary codes ±1) of α·Q: how much of the final hard rounding was already done by training."""
        return on_grid_fraction({n: self.modules[n].weight.detach() for n in layers}, layers, tol)

    def quantized_copy(self) -> tuple[nn.Module, dict[str, LayerCodes]]:
        layers = self()
        return apply_codes(copy.deepcopy(self.model), layers).eval(), layers


StepHook = Callable[[float], None]  # called with t, the share of the run's steps done (0 < t <= 1)
EpochHook = Callable[[int], None]


def run_steps(n: int, epochs: int, batch_size: int) -> int:
    """The optimiser steps of a run: schedules are laid over steps, not epochs, so a 1-epoch
    budget still anneals from start to end (an epoch-wise ρ, τ or ε stays at its start value)."""
    return epochs * math.ceil(n / batch_size)


def on_grid_fraction(weights: dict[str, torch.Tensor], layers: dict[str, LayerCodes], tol: float = 0.05) -> float:
    """Share of all entries of `weights` within `tol` grid steps of their codes' values α·Q."""
    near = total = 0
    for n, lc in layers.items():
        a = lc.alpha.reshape(-1, *([1] * (lc.q.dim() - 1))) if lc.alpha.dim() == 1 else lc.alpha
        step = a * (2.0 if lc.codes.scheme == "binary" else 1.0)
        near += int(((weights[n].to(lc.alpha.device) - lc.weight()).abs() <= tol * step).sum())
        total += lc.q.numel()
    return near / max(total, 1)


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
    before_step: StepHook | None = None,
    after_step: StepHook | None = None,
    after_epoch: EpochHook | None = None,
    extra: list[torch.Tensor] = (),
    extra_lr: float | None = None,
) -> tuple[nn.Module, dict[str, LayerCodes], list[dict]]:
    """Adam on cross-entropy (+ loss_extra) over `model`'s trainable parameters and the method's
    own `extra` tensors (at `extra_lr` when given). `before_step`/`after_step` get the share of the
    run's steps done (`run_steps`), for schedules that end where they should whatever the budget;
    after every epoch the projected (α·Q) model is scored on validation and the
    best one is returned with its codes. Each epoch's row records `on_grid`: the share of weights
    already within 5% of a grid step of their code before that hard rounding (`on_grid_fraction`);
    the last row names the selected epoch and its share."""
    gen = seed_everything(spec.seed)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if extra:
        groups.append({"params": list(extra), "lr": extra_lr or lr})
    opt = torch.optim.Adam(groups, lr=lr)
    x, y = (torch.as_tensor(a).to(device_of(model)) for a in (data.x_train, data.y_train))
    forward = forward or model
    best_model, best_layers = proj.quantized_copy()
    best = evaluate(best_model, data.x_val, data.y_val)
    history = [{"epoch": 0, "val_acc": best[0], "val_loss": best[1], "on_grid": proj.on_grid(best_layers)}]
    best_epoch = 0
    total, done = run_steps(len(x), epochs, batch_size), [0]

    def after() -> None:  # the step just taken counts: t = 1 after the last one
        done[0] += 1
        if after_step is not None:
            after_step(done[0] / total)

    bar = tqdm(range(1, epochs + 1), desc=desc, disable=not spec.progress, leave=False)
    for epoch in bar:
        model.train()
        train_epoch(forward, opt, x, y, batch_size, gen, loss_extra, after,
                    None if before_step is None else lambda: before_step((done[0] + 1) / total))
        if after_epoch is not None:
            after_epoch(epoch)
        qm, layers = proj.quantized_copy()
        val = evaluate(qm, data.x_val, data.y_val)
        history.append({"epoch": epoch, "val_acc": val[0], "val_loss": val[1], "on_grid": proj.on_grid(layers)})
        bar.set_postfix(val=f"{val[0]:.2f}%", on_grid=f"{100 * history[-1]['on_grid']:.0f}%")
        if val[0] > best[0] or (val[0] == best[0] and val[1] < best[1]):
            best, best_model, best_layers, best_epoch = val, qm, layers, epoch
    history.append({"selected_epoch": best_epoch, "on_grid_fraction": history[best_epoch]["on_grid"]})
    return best_model, best_layers, history
