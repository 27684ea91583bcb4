"""What the gradient-based back-ends share (STE, ADMM-Q, ProxQuant, Mirror Descent, AskewSGD): a
method is its `Hooks`, one implementation used by two training loops.

A method differs from plain training only in how the forward pass sees a quantized layer's weight,
an extra loss term, what happens before and after each optimiser step (given t, the share of the
run's steps done), and tensors of its own that train. `hooks(model, spec, params, projector)` in
each method's module builds them once; then either
- `finetune` (qexport's own loop, `qexport quantize --method ste`): Adam over the training split,
  the projected model scored on validation each epoch, the best one kept; or
- `qadmm.qat` (the user's own loop): the hooks become parametrizations of the user's layers and an
  optimizer wrapper, and the user's code trains.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from qadmm.codes import CodeSet, fit
from qadmm.data import Dataset
from qadmm.layers import select_layers
from qadmm.spec import LayerCodes, QuantResult, QuantSpec, apply_codes
from qadmm.train import device_of, evaluate, seed_everything, train_epoch


@dataclass
class Projector:
    """Projects the selected layers of `model` onto their code sets (`QuantSpec.codes_for`),
    warm-starting each α from the previous call (the fast path of the alternating fit). It keeps
    the layers' weight parameters themselves (`weights`), so it reads the float shadow weights even
    where the user's loop has put a parametrization in front of them (`qadmm.qat`)."""

    model: nn.Module
    spec: QuantSpec
    names: list[str] = field(init=False)
    codes: dict[str, CodeSet] = field(init=False)
    alphas: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = [n for n, _ in select_layers(self.model, self.spec)]
        self.codes = {n: self.spec.codes_for(n) for n in self.names}
        modules = dict(self.model.named_modules())
        self.weights: dict[str, nn.Parameter] = {n: modules[n].weight for n in self.names}
        for n in self.names:  # the full multi-start fit once, then warm starts
            self.alphas[n] = fit(self.weights[n].detach(), self.codes[n], self.spec.per_channel).alpha

    def one(self, name: str, w: torch.Tensor | None = None) -> LayerCodes:
        """Layer `name` (its weight, or `w`) projected: a warm-started fit of a few rounds."""
        w = (self.weights[name] if w is None else w).detach()
        f = fit(w, self.codes[name], self.spec.per_channel, alpha0=self.alphas[name], max_iter=5)
        self.alphas[name] = f.alpha
        return LayerCodes(f.q, f.alpha, self.codes[name])

    def __call__(self, weights: dict[str, torch.Tensor] | None = None) -> dict[str, LayerCodes]:
        return {n: self.one(n, (weights or {}).get(n)) for n in self.names}

    def on_grid(self, layers: dict[str, LayerCodes], tol: float = 0.05) -> float:
        """The share of the layers' current float weights within `tol` of a grid step (α; 2α for
        binary codes ±1) of α·Q: how much of the final hard rounding was already done by training."""
        return on_grid_fraction({n: self.weights[n].detach() for n in layers}, layers, tol)

    def quantized_copy(self) -> tuple[nn.Module, dict[str, LayerCodes]]:
        layers = self()
        return apply_codes(copy.deepcopy(self.model), layers).eval(), layers


StepHook = Callable[[float], None]  # called with t, the share of the run's steps done (0 < t <= 1)


@dataclass
class Hooks:
    """One training method around an ordinary optimiser step (see the module). Hooks write the
    layers' weights through `Projector.weights` (the parameters), never through the modules."""

    weight: Callable[[str, torch.Tensor], torch.Tensor] | None = None  # forward's weight of layer n from its parameter
    loss_extra: Callable[[], torch.Tensor] | None = None  # added to the task loss
    before_step: StepHook | None = None  # after backward, before the step: may rewrite gradients
    after_step: StepHook | None = None  # after each step: projections, schedules
    extra: dict[str, nn.Parameter] = field(default_factory=dict)  # the method's own trainable tensor per layer
    extra_lr: float | None = None  # their learning rate (None: the optimiser's)
    summary: Callable[[], dict] = dict  # values for the result's params at the end (e.g. the final β)
    report: Callable[[], dict] = dict  # a row for the history at the end (e.g. AskewSGD's feasible share)

    def forward(self, model: nn.Module, names: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
        """model's forward with each named layer's weight as `weight` makes it (the model itself
        when the method leaves the forward pass alone)."""
        if self.weight is None:
            return model

        def run(x: torch.Tensor) -> torch.Tensor:
            params = dict(model.named_parameters())
            for n in names:
                params[f"{n}.weight"] = self.weight(n, params[f"{n}.weight"])
            return functional_call(model, (params, dict(model.named_buffers())), (x,))

        return run


MakeHooks = Callable[[nn.Module, QuantSpec, Any, Projector], Hooks]  # (model, spec, params, projector) -> Hooks


def train(name: str, make_hooks: MakeHooks, params_cls: type, model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    """A training back-end's `quantize` (qexport's own loop): its hooks on a copy of `model`, `finetune`."""
    p = spec.resolve(params_cls)
    model = copy.deepcopy(model).to(spec.device)
    proj = Projector(model, spec)
    hooks = make_hooks(model, spec, p, proj)
    qm, layers, history = finetune(model, data, spec, proj, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
                                   desc=name, hooks=hooks)
    report = hooks.report()
    return QuantResult(qm, layers, name, {**asdict(p), **hooks.summary()}, history + ([report] if report else []))


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


def finetune(model: nn.Module, data: Dataset, spec: QuantSpec, proj: Projector, *, epochs: int, lr: float,
             batch_size: int, desc: str, hooks: Hooks | None = None) -> tuple[nn.Module, dict[str, LayerCodes], list[dict]]:
    """Adam on cross-entropy (+ the hooks' extra loss) over `model`'s trainable parameters and the
    method's own tensors (at their `extra_lr` when given). The step hooks get the share of the
    run's steps done (`run_steps`), for schedules that end where they should whatever the budget;
    after every epoch the projected (α·Q) model is scored on validation and the best one is
    returned with its codes. Each epoch's row records `on_grid`: the share of weights already within
    5% of a grid step of their code before that hard rounding (`on_grid_fraction`); the last row
    names the selected epoch and its share."""
    hooks = hooks or Hooks()
    gen = seed_everything(spec.seed)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if hooks.extra:
        groups.append({"params": list(hooks.extra.values()), "lr": hooks.extra_lr or lr})
    opt = torch.optim.Adam(groups, lr=lr)
    x, y = (torch.as_tensor(a).to(device_of(model)) for a in (data.x_train, data.y_train))
    forward = hooks.forward(model, proj.names)
    best_model, best_layers = proj.quantized_copy()
    best = evaluate(best_model, data.x_val, data.y_val)
    history = [{"epoch": 0, "val_acc": best[0], "val_loss": best[1], "on_grid": proj.on_grid(best_layers)}]
    best_epoch = 0
    total, done = run_steps(len(x), epochs, batch_size), [0]

    def after() -> None:  # the step just taken counts: t = 1 after the last one
        done[0] += 1
        if hooks.after_step is not None:
            hooks.after_step(done[0] / total)

    before = None if hooks.before_step is None else (lambda: hooks.before_step((done[0] + 1) / total))
    bar = tqdm(range(1, epochs + 1), desc=desc, disable=not spec.progress, leave=False)
    for epoch in bar:
        model.train()
        train_epoch(forward, opt, x, y, batch_size, gen, hooks.loss_extra, after, before)
        qm, layers = proj.quantized_copy()
        val = evaluate(qm, data.x_val, data.y_val)
        history.append({"epoch": epoch, "val_acc": val[0], "val_loss": val[1], "on_grid": proj.on_grid(layers)})
        bar.set_postfix(val=f"{val[0]:.2f}%", on_grid=f"{100 * history[-1]['on_grid']:.0f}%")
        if val[0] > best[0] or (val[0] == best[0] and val[1] < best[1]):
            best, best_model, best_layers, best_epoch = val, qm, layers, epoch
    history.append({"selected_epoch": best_epoch, "on_grid_fraction": history[best_epoch]["on_grid"]})
    return best_model, best_layers, history
