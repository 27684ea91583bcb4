"""LQ: layerwise quantization with ADMM (thesis ch. 5). Layer by layer: ADMM on W ≈ α·Q, fix α·Q, retrain later layers.

For each quantizable layer l in forward order, with layers 1..l-1 fixed at α·Q and l+1..L float:

1. ADMM on the split W_l = G_l, G_l ∈ α·C (eq. 5.2-5.6), for at most `iters` rounds:
   - W-step (eq. 5.8): `inner_epochs` passes of minibatch Adam on the task loss R plus the
     augmented term ρ/2‖W_l − G_l + λ/ρ‖²; with `joint` the later float layers move with W_l;
   - G-step (eq. 5.9-5.15): the alternating α/Q fit of V = W_l + λ/ρ (`qadmm.codes.fit`, Algorithm 8),
     warm-started from the previous α;
   - dual step (eq. 5.16): λ ← λ + ρ(W_l − G_l); then ρ ← ρ·`rho_growth`.
   The round whose G_l (with the later layers and their BatchNorm statistics as they were then) scores
   best on validation is kept;
   the loop stops early once ‖W_l − G_l‖/‖W_l‖ < `tol`.
2. Fix W̄_l = α_l·Q_l (exactly; its weight is never touched again).
3. Retrain the float parameters after layer l (eq. 5.17), BatchNorm included, plus layer l's bias,
   for `retrain_epochs` epochs, keeping the epoch that scores best on validation.

The penalty is divided by ‖W_l⁰‖² (the layer's float weights), so one ρ means the same for every
layer and model: ρ/2 is the loss, in nats, of a relative residual of 1.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from qadmm.codes import CodeSet, fit
from qadmm.data import Dataset
from qadmm.errors import UserError
from qadmm.layer_inputs import input_hessian, weight_matrix
from qadmm.layers import Stage, select_layers, stage
from qadmm.layerwise import layer_codes
from qadmm.methods.gptq import GPTQ
from qadmm.methods.gptq import Params as GPTQParams
from qadmm.methods.method import Method
from qadmm.spec import LayerCodes, QuantResult, QuantSpec
from qadmm.train import batches, check_loss, device_of, evaluate, seed_everything


@dataclass
class Params:
    POSITIVE: ClassVar[tuple[str, ...]] = ("iters", "inner_epochs", "rho", "rho_growth", "lr", "batch_size", "min_steps")  # meaningless at 0: step sizes, penalties, counts
    # Defaults measured on pendigits/seeds/digits (thesis scheme, 1-8 bits); see docs/lq.md.
    iters: int = 20  # ADMM rounds per layer (cap)
    inner_epochs: float = 1.0  # W-step length in passes over the training set (fractions allowed)
    rho: float = 0.1  # initial penalty ρ (on the ‖W_l⁰‖²-normalised residual)
    rho_growth: float = 1.5  # ρ ← ρ·growth after every dual step; 1 keeps ρ fixed
    tol: float = 1e-3  # stop once ‖W − G‖/‖W‖ falls below this
    lr: float = 3e-3  # Adam learning rate of the W-step
    joint: bool = True  # the W-step also trains the later float layers (eq. 5.8 + 5.17 together)
    retrain_epochs: float = 5.0  # epochs of retraining of the later layers after fixing a layer (eq. 5.17)
    retrain_lr: float = 1e-3
    batch_size: int = 32
    min_steps: int = 100  # floor on minibatches per W-step and per retraining epoch (tiny datasets)
    select: str = "acc"  # model selection on validation: "acc" (accuracy, ties by loss) or "loss"
    # Scaling to CNNs (docs/lq.md, "LQ on CNNs"): none of these changes what one round computes.
    budget_epochs: float = 0.0  # > 0: fit the schedule to this many passes over the training set in all
    budget_admm_share: float = 0.75  # ... of which this share goes to the W-steps, the rest to retraining
    warm_start: str = "nearest"  # G⁰: "nearest" (the thesis: PTQ's fit) or "gptq" (output-aware rounding)
    cache_inputs: bool = True  # run the fixed prefix once per layer, not every minibatch (nn.Sequential models)
    val_samples: int = 0  # > 0: select rounds/epochs on this many validation samples (large validation splits)

    def __post_init__(self) -> None:  # bad values are refused when the spec is resolved, before any work
        if self.iters < 0 or self.inner_epochs <= 0 or self.rho <= 0 or self.rho_growth < 1 or self.lr <= 0 or self.batch_size < 1:
            raise UserError("lq: need iters >= 0, inner_epochs > 0, rho > 0, rho_growth >= 1, lr > 0, batch_size >= 1")
        if self.select not in ("acc", "loss"):
            raise UserError(f"lq: select={self.select!r}: use select=acc or select=loss")
        if self.warm_start not in ("nearest", "gptq"):
            raise UserError(f"lq: warm_start={self.warm_start!r}: use nearest or gptq")
        if self.budget_epochs < 0 or not 0 < self.budget_admm_share <= 1 or self.retrain_epochs < 0:
            raise UserError("lq: need budget_epochs >= 0, 0 < budget_admm_share <= 1, retrain_epochs >= 0")


def set_modes(model: nn.Module, st: Stage) -> None:
    """Train mode for layer l and after, eval mode before it (frozen BatchNorm keeps its statistics)."""
    model.train()
    for m in st.frozen_modules:
        m.eval()


def sequential_units(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """`model` as a flat chain of (name, module) units when it is built of nested nn.Sequential (the
    zoo: Normalize, then body layers and residual blocks), so that model(x) = units[k:](units[:k](x));
    None for a model with its own forward."""
    if type(model) is not nn.Sequential:
        return None
    units: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, m: nn.Module) -> None:
        for n, c in m.named_children():
            if type(c) is nn.Sequential:
                walk(f"{prefix}{n}.", c)
            else:
                units.append((f"{prefix}{n}", c))

    walk("", model)
    return units


class Inputs:
    """What LQ trains and scores on for the current layer: the model, or (with the cache) only the
    units from the one holding that layer on, fed with the outputs of the fixed units before it.

    The cache advances with the layer walk: moving to a later unit runs just the units in between on
    the cached tensors, so the whole walk costs one forward pass of the data through the network. A
    unit is cached only once it lies wholly before the current layer: its weights are fixed and it runs
    in eval mode (BatchNorm statistics frozen), so its outputs no longer change."""

    def __init__(self, model: nn.Module, data: Dataset, cache: bool, val_samples: int = 0):
        dev = device_of(model)
        self.model = model
        self.units = sequential_units(model) if cache else None
        self.k = 0
        nv = val_samples if 0 < val_samples < len(data.y_val) else len(data.y_val)
        self.x, self.y = (torch.as_tensor(a).to(dev) for a in (data.x_train, data.y_train))
        self.x_val, self.y_val = (torch.as_tensor(a[:nv]).to(dev) for a in (data.x_val, data.y_val))

    @property
    def runner(self) -> nn.Module:
        return self.model if self.units is None else nn.Sequential(*(m for _, m in self.units[self.k:]))

    @torch.no_grad()
    def advance_to(self, layer_name: str) -> None:
        """Move the cache to the unit that holds `layer_name` (never backwards)."""
        if self.units is None:
            return
        k = next(i for i, (n, _) in enumerate(self.units) if layer_name == n or layer_name.startswith(n + "."))
        if k <= self.k:
            return
        between = nn.Sequential(*(m for _, m in self.units[self.k:k])).eval()
        self.x = torch.cat([between(xb) for xb in self.x.split(512)])
        self.x_val = torch.cat([between(xb) for xb in self.x_val.split(512)])
        self.k = k

    def score(self, select: str = "acc") -> tuple[float, float]:
        """Validation key, higher is better: (accuracy %, −cross-entropy), or (−cross-entropy, accuracy)
        with select="loss" (smoother on small validation splits)."""
        acc, loss = evaluate(self.runner, self.x_val, self.y_val.cpu().numpy())
        return (acc, -loss) if select == "acc" else (-loss, acc)


class Trainer:
    """Minibatch Adam over a fixed parameter list, with an optional extra loss; steps counted exactly."""

    def __init__(self, model: nn.Module, inputs: Inputs, st: Stage, params: list[nn.Parameter], lr: float,
                 batch_size: int, gen: torch.Generator, min_steps: int = 1):
        self.model, self.st, self.params = model, st, params
        self.opt = torch.optim.Adam(params, lr=lr)
        self.runner, self.x, self.y = inputs.runner, inputs.x, inputs.y
        self.batch_size, self.gen, self.min_steps = batch_size, gen, min_steps
        self.ce = nn.CrossEntropyLoss()

    def run(self, epochs: float, extra=None) -> float:
        """`epochs` passes (fractions allowed, at least one minibatch); returns the mean task loss."""
        steps = max(1, self.min_steps, round(epochs * -(-len(self.x) // self.batch_size)))
        own = set(map(id, self.params))
        for p in self.model.parameters():  # only this stage's parameters get gradients
            p.requires_grad_(id(p) in own)
        set_modes(self.model, self.st)
        total, done = 0.0, 0
        while done < steps:
            for idx in batches(len(self.x), self.batch_size, self.gen):
                self.opt.zero_grad(set_to_none=True)
                loss = self.ce(self.runner(self.x[idx]), self.y[idx])
                total += float(loss.detach())
                if extra is not None:
                    loss = loss + extra()
                check_loss(loss, "LQ's training step")
                loss.backward()
                self.opt.step()
                done += 1
                if done >= steps:
                    break
        return total / steps


def admm_layer(model: nn.Module, inputs: Inputs, name: str, g0: LayerCodes, per_channel: bool, p: Params,
               gen: torch.Generator, progress: bool = False, desc: str = "") -> tuple[LayerCodes, dict]:
    """ADMM on one layer (eq. 5.2-5.16) from G⁰ = `g0`. Leaves the model with W_l = α·Q of the best
    round (by validation) and the later layers as they were in that round; returns the codes and a log."""
    codes = g0.codes
    st = stage(model, name)
    w = st.weight
    w0 = w.detach().clone()
    scale = max(float((w0**2).sum()), 1e-30)  # normalises the penalty: ρ is per relative residual²
    f = g0
    g, alpha = f.weight().to(w0.device), f.alpha.to(w0.device)
    lam = torch.zeros_like(w0)  # λ⁰ = 0
    rho = p.rho
    params = [w] + (st.later if p.joint else [st.bias] if st.bias is not None else [])
    trainer = Trainer(model, inputs, st, params, p.lr, p.batch_size, gen, p.min_steps)

    def penalty() -> torch.Tensor:  # eq. 5.8: ρ/2‖W − G + λ/ρ‖², normalised by ‖W⁰‖²
        return rho / (2 * scale) * ((w - g + lam / rho) ** 2).sum()

    def scored_with(q_w: torch.Tensor) -> tuple[float, float]:
        keep = w.detach().clone()
        with torch.no_grad():
            w.copy_(q_w)
        s = inputs.score(p.select)
        with torch.no_grad():
            w.copy_(keep)
        return s

    best_key = scored_with(g)  # round 0: plain projection with the trained later layers
    best = (f.q, f.alpha, st.snapshot())
    best_round, residual, loss, rounds, residuals = 0, float("nan"), float("nan"), 0, []
    bar = tqdm(range(1, p.iters + 1), desc=desc, disable=not progress, leave=False)
    for k in bar:
        rounds = k
        loss = trainer.run(p.inner_epochs, penalty)  # W-step, eq. 5.8
        with torch.no_grad():
            v = w.detach() + lam / rho  # V = W + λ/ρ
            f = fit(v, codes, per_channel, alpha0=alpha, max_iter=10)  # G-step, eq. 5.9-5.15 (Algorithm 8)
            g, alpha = f.dequantize(), f.alpha
            lam += rho * (w.detach() - g)  # dual step, eq. 5.16
            residual = float((w.detach() - g).norm() / w.detach().norm().clamp_min(1e-30))
            residuals.append(round(residual, 6))
        key = scored_with(g)
        if key > best_key:
            best_key, best_round = key, k
            best = (f.q, f.alpha, st.snapshot())
        bar.set_postfix(res=f"{residual:.3g}", loss=f"{loss:.3f}", val=f"{key[0]:.1f}%", rho=f"{rho:.3g}")
        rho *= p.rho_growth
        if residual < p.tol:
            break
    q, alpha, later = best
    lc = LayerCodes(q.cpu(), alpha.cpu(), codes)
    with torch.no_grad():  # step 2: fix W̄_l = α·Q (and restore the later layers of that round)
        w.copy_(lc.weight().to(w.device))
    st.restore(later)
    acc = best_key[0] if p.select == "acc" else best_key[1]
    return lc, {"rounds": rounds, "best_round": best_round, "residual": residual, "rho_end": rho,
                "w_loss": loss, "val_acc_fixed": acc, "residuals": residuals}


def retrain_later(model: nn.Module, inputs: Inputs, name: str, epochs: float, lr: float, batch_size: int,
                  gen: torch.Generator, progress: bool = False, desc: str = "", min_steps: int = 1,
                  select: str = "acc") -> tuple[float, float]:
    """Eq. 5.17: train only the float parameters after layer `name` (and its bias); keep the epoch
    (0 included; a fraction of an epoch counts as one) that scores best on validation. Returns that
    (val acc, val loss)."""
    st = stage(model, name)
    best_key = inputs.score(select)
    best = st.snapshot()
    if st.later and epochs > 0:
        trainer = Trainer(model, inputs, st, st.later, lr, batch_size, gen, min_steps)
        chunks = [1.0] * int(epochs) + ([epochs - int(epochs)] if epochs % 1 else [])
        for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
            trainer.run(chunk)
            key = inputs.score(select)
            if key > best_key:
                best_key, best = key, st.snapshot()
    st.restore(best)
    return (best_key[0], -best_key[1]) if select == "acc" else (best_key[1], -best_key[0])


def start_codes(model: nn.Module, name: str, codes: CodeSet, per_channel: bool, calib: torch.Tensor | None) -> LayerCodes:
    """G⁰ of layer `name`: the full multi-start fit of the float weights (= PTQ), or with calibration
    inputs GPTQ's output-aware rounding on the current (partly quantized) model."""
    m = dict(model.named_modules())[name]
    if calib is None:
        f = fit(m.weight.detach().cpu(), codes, per_channel)
        return LayerCodes(f.q, f.alpha, codes)
    q, alpha = GPTQ(weight_matrix(m).cpu(), input_hessian(model, m, calib).cpu()).quantize(codes, per_channel, GPTQParams())
    return layer_codes(q, alpha, m.weight.shape, codes, per_channel)


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    p = spec.resolve(Params)
    model = copy.deepcopy(model).to(spec.device)
    gen = seed_everything(spec.seed)
    names = [n for n, _ in select_layers(model, spec)]
    if p.budget_epochs > 0 and names:  # the same passes for every layer: W-steps share `budget_admm_share`
        per_layer = p.budget_epochs / len(names)
        p.inner_epochs = per_layer * p.budget_admm_share / max(p.iters, 1)
        p.retrain_epochs = per_layer * (1 - p.budget_admm_share)
        p.min_steps = 1  # the budget decides the length; the floor is for tiny data sets without one
    inputs = Inputs(model, data, p.cache_inputs, p.val_samples)
    calib = data.calibration(spec.calib_samples, spec.seed).to(device_of(model)) if p.warm_start == "gptq" else None
    layers: dict[str, LayerCodes] = {}
    history = []
    bar = tqdm(names, desc=f"lq {spec.describe_codes()}", disable=not spec.progress)
    for i, name in enumerate(bar):
        t0 = time.perf_counter()
        bar.set_postfix(layer=name)
        inputs.advance_to(name)
        g0 = start_codes(model, name, spec.codes_for(name), spec.per_channel, calib)
        lc, log = admm_layer(model, inputs, name, g0, spec.per_channel, p, gen, spec.progress, f"  admm {name}")
        layers[name] = lc
        acc, loss = retrain_later(model, inputs, name, p.retrain_epochs, p.retrain_lr, p.batch_size, gen,
                                  spec.progress, f"  retrain after {name}", p.min_steps, p.select)
        history.append({"layer": name, **log, "val_acc": acc, "val_loss": loss, "seconds": round(time.perf_counter() - t0, 2)})
    for prm in model.parameters():
        prm.requires_grad_(True)
    model.eval()
    return QuantResult(model, layers, "lq", asdict(p), history)


METHOD = Method("lq", quantize, Params, __doc__)
