"""Quantization-aware training in the user's own loop: prepare, train with your code, convert.

    model = qadmm.qat.prepare(model, "md-tanh", QuantSpec(bits=2, per_channel=True), steps=epochs * len(loader))
    opt = qadmm.qat.optimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3))  # the same optimiser, hooked
    for x, y in loader:  # your data, augmentations, loss, schedule
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    result = qadmm.qat.convert(model)  # codes and scales; `qexport.convert` makes the verified artifact

A training back-end is its `Hooks` (`qadmm.finetune`): the same object `qexport quantize --method ste`
trains with. `prepare` builds them on the user's model, in place: each quantized layer's weight gets
a parametrization that computes the method's forward weight (STE's α·Π(W), Mirror Descent's α·P_β(ũ),
AskewSGD's α·u) and holds the method's own tensor for that layer (ũ, u) as a parameter, so an optimiser
over `model.parameters()` trains it. The `optimizer` wrapper runs
the step hooks around each step with t = steps done / `steps` (the schedules: β, ε, ρ, τ) and adds
the gradient of the method's extra loss (ADMM-Q's penalty) to the weights' gradients, so the user's
loss stays as it is (`optimizer` hooks the user's optimiser object; it is not wrapped). `convert` removes all of it and projects the weights onto the codes.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from qadmm.errors import UserError
from qadmm.finetune import Hooks, Projector
from qadmm.spec import QuantResult, QuantSpec, apply_codes

ATTR = "_qexport_qat"  # where prepare keeps its state on the model (an attribute, not a submodule)
LOOP = ("epochs", "lr", "batch_size")  # hyperparameters of qexport's own loop: in yours, your code sets them


def trainers() -> list[str]:
    """The back-ends that train in the user's loop: those with `hooks`."""
    from qadmm import methods

    return [n for n, m in methods.METHODS.items() if m.hooks is not None]


@dataclass
class State:
    method: str
    spec: QuantSpec
    params: Any  # the method's Params
    proj: Projector
    hooks: Hooks
    steps: int
    float_model: nn.Module  # the model as prepare received it (float accuracy, bias correction)
    done: int = 0
    handles: list = field(default_factory=list)  # the optimiser hooks, removed by convert


class _Weight(nn.Module):
    """The parametrization of one layer's weight: the method's forward weight from the float one. The
    method's own tensor for this layer (ũ, u), if any, is its parameter: an optimiser over the user's
    `model.parameters()` trains it."""

    def __init__(self, fn: Callable[[str, torch.Tensor], torch.Tensor], name: str, own: nn.Parameter | None):
        super().__init__()
        self.fn, self.name = fn, name
        if own is not None:
            self.own = own

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.fn(self.name, w)


def state_of(model: nn.Module) -> State:
    st = model.__dict__.get(ATTR)
    if not isinstance(st, State):
        raise UserError("this model was not prepared for quantization-aware training: call qexport.prepare(model, ...) first")
    return st


def check_unprepared(model: nn.Module) -> None:
    if ATTR in model.__dict__:
        raise UserError("this model is already prepared: convert it first, or prepare a fresh copy")


def prepare(model: nn.Module, method: str, spec: QuantSpec, steps: int) -> nn.Module:
    """`model`, in place, ready for `method` in the user's training loop of `steps` optimiser steps (see
    the module). Returns the same object."""
    from qadmm import methods

    if method not in trainers():
        raise UserError(f"method {method!r} does not train in your loop: use one of {', '.join(trainers())} "
                        "(calibration-only methods need no training: qexport.quantize)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps={steps!r}: give the number of optimiser steps your loop will take (epochs × batches), at least 1")
    check_unprepared(model)
    methods.check(method, spec)
    mod = methods.get_method(method)
    p = spec.resolve(mod.Params)
    float_model = copy.deepcopy(model).eval()
    proj = Projector(model, spec)
    hooks = mod.hooks(model, spec, p, proj)
    if hooks.weight is not None:
        modules = dict(model.named_modules())
        for n in proj.names:
            parametrize.register_parametrization(modules[n], "weight", _Weight(hooks.weight, n, hooks.extra.get(n)),
                                                 unsafe=True)
    model.__dict__[ATTR] = State(method, spec, p, proj, hooks, steps, float_model)  # not a submodule: forward is untouched
    return model


def optimizer(model: nn.Module, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`opt` itself (built over `model.parameters()` after `prepare`), with the method's steps hooked
    around each `opt.step()` (`register_step_pre_hook` / `_post_hook`: an LR scheduler or gradient
    scaler still sees a plain optimiser): before it, the extra loss's gradient (as if the user's loss
    included it) and `before_step`; after it, `after_step`, with t = steps done / `steps`."""
    st = state_of(model)
    h = st.hooks
    if h.extra and h.extra_lr is not None:  # the method's tensors at their own rate (AskewSGD's grid_lr)
        ids = {id(t) for t in h.extra.values()}
        for g in opt.param_groups:
            g["params"] = [q for q in g["params"] if id(q) not in ids]
        base = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        opt.add_param_group({**base, "params": list(h.extra.values()), "lr": h.extra_lr, "initial_lr": h.extra_lr})

    def before(_opt, _args, _kwargs) -> None:
        if h.loss_extra is not None:
            ws = [w for w in st.proj.weights.values() if w.requires_grad]
            for w, g in zip(ws, torch.autograd.grad(h.loss_extra(), ws)):
                w.grad = g if w.grad is None else w.grad + g
        if h.before_step is not None:
            h.before_step(min((st.done + 1) / st.steps, 1.0))

    def after(_opt, _args, _kwargs) -> None:
        st.done += 1
        if h.after_step is not None:
            h.after_step(min(st.done / st.steps, 1.0))

    st.handles += [opt.register_step_pre_hook(before), opt.register_step_post_hook(after)]
    return opt


def convert(model: nn.Module) -> tuple[nn.Module, QuantResult, State]:
    """Undo `prepare` on `model` (in place: its weights are the float shadow weights again) and
    project them onto the codes: (the float model prepare received, the result, the state)."""
    st = state_of(model)
    modules = dict(model.named_modules())
    for n in st.proj.names:
        if parametrize.is_parametrized(modules[n], "weight"):
            parametrize.remove_parametrizations(modules[n], "weight", leave_parametrized=False)
    for handle in st.handles:
        handle.remove()
    del model.__dict__[ATTR]
    layers = st.proj()
    qmodel = apply_codes(copy.deepcopy(model), layers).eval()
    report = st.hooks.report()
    history = [{"steps": st.done, "steps_planned": st.steps}] + ([report] if report else [])
    params = {k: v for k, v in asdict(st.params).items() if k not in LOOP}
    result = QuantResult(qmodel, layers, st.method, {**params, **st.hooks.summary(), "loop": "yours"}, history)
    return st.float_model, result, st
