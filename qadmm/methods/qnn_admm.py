"""QNN-ADMM: gradient-free training of a quantized MLP (thesis ch. 3-4, Algorithms 2-7, eq. 3.6).

The network is split into per-layer variables W_l (float), G_l = α_l·Q_l (on the code set),
z_l = W_l a_{l−1} + b_l and a_l = relu(z_l), coupled by penalties, with one multiplier λ on the
output constraint (optionally also a scaled multiplier U_l on every W_l = G_l):

    (1/n)[CE(z_L, y) + ⟨λ, z_L − W_L a_{L−1} − b_L⟩ + β/2 Σ‖z_l − W_l a_{l−1} − b_l‖² + γ/2 Σ‖a_l − h(z_l)‖²]
        + μ/2 Σ‖W_l − G_l‖²                                                              (eq. 3.6)

One iteration is a backward sweep (l = L..1: a_l, z_l, W_l, b_l, G_l), a forward sweep
(l = 1..L: W_l, b_l, G_l, z_l, a_l) and λ ← λ + β(z_L − W_L a_{L−1} − b_L) (Algorithm 2). The
subproblem solvers are in `qadmm.admm_steps`. Prediction uses G, never W; the G with the best
validation accuracy over the iterations (the initial projection included) is returned.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from qadmm import admm_steps as st
from qadmm.codes import fit
from qadmm.data import Dataset
from qadmm.errors import UserError
from qadmm.layers import select_layers
from qadmm.methods.method import Method
from qadmm.spec import LayerCodes, QuantResult, QuantSpec, apply_codes
from qadmm.train import seed_everything
from qadmm.zoo import mlp_layers


@dataclass
class Params:
    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size",)  # meaningless at 0: step sizes, penalties, counts
    """Defaults chosen by measurement (docs/qnn-admm.md): thesis scheme, Seeds/Pendigits/MNIST-10k,
    bits 8/2/1. Exact W/a solves and a multiplier on every W_l = G_l beat the thesis configuration
    (linearised steps, λ on z_L only) most at 1-2 bits, e.g. Pendigits 1 bit 69.6% vs 49.1% (3 seeds)."""

    iterations: int = 100  # outer ADMM iterations (one backward + one forward sweep + λ step each)
    patience: int = 40  # stop after this many iterations without a better validation accuracy (0: never)
    beta: float = 5.0  # β: weight of z_l = W_l a_{l-1} + b_l (per sample); 5 beat 1 on Pendigits 2 bits
    gamma: float = 5.0  # γ: weight of a_l = relu(z_l) (per sample)
    mu: float = 1.0  # μ: weight of W_l = G_l (not per sample); 1e-3..1e-1 left W at the float weights
    mu_growth: float = 1.0  # μ ← min(μ·growth, mu_max) after every iteration (1.02 measured: no gain)
    mu_max: float = 1e3
    multipliers: str = "all"  # "output": λ on z_L only (the thesis); "all": also U_l on every W_l = G_l
    solver: str = "exact"  # W- and a-steps: "linearized" (thesis Algorithms 3/6) or "exact" (eq. 4.4/4.27 solves)
    kappa: float = 2.0  # κ: backtracking factor of υ (W-step, Algorithm 3)
    tau: float = 2.0  # τ: backtracking factor of θ (a-step, Algorithm 6)
    max_doublings: int = 30  # cap on backtracking doublings per call
    fista_iters: int = 50  # cap on FISTA steps of the z_L update (Algorithm 7)
    fista_tol: float = 1e-5  # FISTA stops when no logit moves by more than this
    init: str = "float"  # "float": start from the given model's weights; "scratch": re-initialise them (seed)
    zl_init: str = "forward"  # "forward": z_L from the forward pass; "onehot": ±1 from the labels (dlADMM)
    batch_size: int = 0  # 0: full batch; else sweep over blocks of this many samples per iteration
    dtype: str = "auto"  # "float32", "float64", or "auto" (float64 when the state is at most 2e6 floats)


def _mlp_linears(model: nn.Module) -> tuple[list[nn.Module], list[tuple[str, nn.Linear]]]:
    """(preprocessing modules, named Linear layers) of a Linear/ReLU MLP, or a UserError."""
    supported = "Normalize/Flatten preprocessing then Linear, ReLU, Linear, ..., Linear"
    try:
        pre, layers = mlp_layers(model)
    except ValueError as e:
        raise UserError(f"qnn-admm trains MLPs only ({supported}); {e}: use --method lq, admm-q or ste for other models") from None
    if [relu for _, _, relu in layers] != [True] * (len(layers) - 1) + [False]:
        kinds = ", ".join("Linear, ReLU" if relu else "Linear" for _, _, relu in layers)
        raise UserError(f"qnn-admm trains MLPs only ({supported}); this model's layers are {kinds}")
    return pre, [(n, m) for n, m, _ in layers]


def memory_floats(n: int, widths: list[int]) -> int:
    """Floats held by the split variables: the input a_0, z_l and a_l per hidden layer, z_L and λ
    (about n·Σ widths per variable set)."""
    return n * (widths[0] + 2 * sum(widths[1:-1]) + 2 * widths[-1])


def _check(p: Params) -> None:
    if p.multipliers not in ("output", "all"):
        raise UserError(f"multipliers={p.multipliers!r}: use 'output' (λ on z_L, the thesis) or 'all'")
    if p.init not in ("float", "scratch"):
        raise UserError(f"init={p.init!r}: use 'float' (the given model) or 'scratch'")
    if p.zl_init not in ("forward", "onehot"):
        raise UserError(f"zl_init={p.zl_init!r}: use 'forward' or 'onehot'")
    if p.solver not in ("linearized", "exact"):
        raise UserError(f"solver={p.solver!r}: use 'linearized' (thesis Algorithms 3/6) or 'exact'")
    if p.dtype not in ("auto", "float32", "float64"):
        raise UserError(f"dtype={p.dtype!r}: use auto, float32 or float64")
    if min(p.beta, p.gamma, p.mu, p.mu_max) <= 0 or p.mu_growth < 1 or p.kappa <= 1 or p.tau <= 1:
        raise UserError("qnn-admm needs beta, gamma, mu, mu_max > 0, mu_growth >= 1 and kappa, tau > 1")
    if p.iterations < 0 or p.batch_size < 0 or p.fista_iters < 1 or p.max_doublings < 1:
        raise UserError("qnn-admm needs iterations, batch_size >= 0 and fista_iters, max_doublings >= 1")


class _Net:
    """The split variables of one run and the sweeps of Algorithm 2 over one block of samples."""

    def __init__(self, Ws, bs, codes, per_channel, a0, y, p: Params, dtype):
        self.p, self.codes, self.per_channel = p, codes, per_channel  # codes: per layer, None for a layer kept float
        self.L = len(Ws)
        self.W = [w.to(dtype) for w in Ws]
        self.has_bias = [b is not None for b in bs]  # a Linear without bias keeps b = 0
        self.b = [b.to(dtype) if b is not None else torch.zeros(w.shape[0], dtype=dtype) for w, b in zip(Ws, bs)]
        self.quantized = [c is not None for c in codes]  # False for a layer kept float (no G, no μ term)
        self.a0, self.y = a0, y
        self.mu = p.mu
        self.alpha: list[torch.Tensor | None] = [None] * self.L  # float32 scales of the last G-step
        self.Q: list[torch.Tensor | None] = [None] * self.L  # integer codes of the last G-step
        self.G = [w.clone() for w in self.W]
        self.U = [torch.zeros_like(w) for w in self.W]
        for l in range(self.L):
            self.g_step(l, first=True)
        # forward pass: z_l, a_l; λ = 0
        self.z, self.a = [], [a0]
        h = a0
        for l in range(self.L):
            z = h @ self.W[l].T + self.b[l]
            self.z.append(z)
            if l < self.L - 1:
                h = torch.relu(z)
                self.a.append(h)
        if p.zl_init == "onehot":
            self.z[-1] = 2 * torch.zeros_like(self.z[-1]).scatter_(1, y[:, None], 1.0) - 1
        self.lam = torch.zeros_like(self.z[-1])
        self.ups = [st.Curvature(1.0, p.kappa, p.max_doublings) for _ in range(self.L)]
        self.theta = [st.Curvature(1.0, p.tau, p.max_doublings) for _ in range(self.L)]
        self.fista_steps = 0
        self.gram0: dict = {}

    # -- the per-variable updates (rows `s` of the sample-indexed variables) --
    def target(self, l: int, s: slice) -> torch.Tensor:
        """What W_l a_{l−1} + b_l should equal: z_l, or z_L + λ/β at the output (see admm_steps)."""
        return self.z[l][s] + self.lam[s] / self.p.beta if l == self.L - 1 else self.z[l][s]

    def m(self, l: int, s: slice) -> torch.Tensor:
        return self.a[l][s] @ self.W[l].T + self.b[l]

    def g_step(self, l: int, first: bool = False) -> None:
        if not self.quantized[l]:
            self.G[l] = self.W[l]
            return
        v = self.W[l] + self.U[l] if self.p.multipliers == "all" else self.W[l]
        f = fit(v, self.codes[l], self.per_channel) if first else \
            fit(v, self.codes[l], self.per_channel, alpha0=self.alpha[l], max_iter=10)
        self.alpha[l], self.Q[l] = f.alpha, f.q
        self.G[l] = f.dequantize().to(v.dtype)  # exactly the float32 α·Q the exported model computes
        if self.p.multipliers == "all" and not first:
            self.U[l] = self.U[l] + self.W[l] - self.G[l]  # scaled dual ascent on W_l = G_l

    def w_step(self, l: int, s: slice) -> None:
        a, t = self.a[l][s], self.target(l, s)
        mu = self.mu if self.quantized[l] else 0.0
        anchor = self.G[l] - self.U[l] if self.p.multipliers == "all" else self.G[l]
        if self.p.solver == "exact":
            gram = None
            if l == 0:  # a_0 is fixed: its Gram matrix is computed once per block
                key = (s.start, s.stop)
                if key not in self.gram0:
                    A = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1) if self.has_bias[0] else a
                    self.gram0[key] = A.T @ A
                gram = self.gram0[key]
            self.W[l], self.b[l] = st.w_exact(anchor, a, t, self.p.beta / len(a), mu, self.has_bias[l], gram)
            return
        self.W[l] = st.w_step(self.W[l], anchor, a, t, self.b[l], self.p.beta / len(a), mu, self.ups[l])
        if self.has_bias[l]:
            self.b[l] = st.bias_step(self.W[l], a, t)

    def a_step(self, l: int, s: slice) -> None:  # a_l, l < L (hidden)
        hz = torch.relu(self.z[l][s])
        if self.p.solver == "exact":
            self.a[l + 1][s] = st.a_exact(hz, self.target(l + 1, s), self.W[l + 1], self.b[l + 1], self.p.beta, self.p.gamma)
            return
        self.a[l + 1][s] = st.a_step(self.a[l + 1][s], hz, self.target(l + 1, s), self.W[l + 1], self.b[l + 1],
                                     self.p.beta, self.p.gamma, self.theta[l])

    def z_step(self, l: int, s: slice) -> None:
        m = self.m(l, s)
        if l < self.L - 1:
            self.z[l][s] = st.z_hidden_step(m, self.a[l + 1][s], self.p.beta, self.p.gamma)
        else:
            self.z[l][s], k = st.z_last_step(self.z[l][s], m, self.y[s], self.lam[s], self.p.beta,
                                             self.p.fista_iters, self.p.fista_tol)
            self.fista_steps += k

    def sweep(self, s: slice) -> None:
        """Algorithm 2 on the samples `s`: backward sweep, forward sweep, λ step."""
        for l in reversed(range(self.L)):
            if l < self.L - 1:
                self.a_step(l, s)
            self.z_step(l, s)
            self.w_step(l, s)
            self.g_step(l)
        for l in range(self.L):
            self.w_step(l, s)
            self.g_step(l)
            self.z_step(l, s)
            if l < self.L - 1:
                self.a_step(l, s)
        self.lam[s] = st.lambda_step(self.lam[s], self.z[-1][s], self.m(self.L - 1, s), self.p.beta)

    def grow_mu(self) -> None:
        new = min(self.mu * self.p.mu_growth, self.p.mu_max)
        if self.p.multipliers == "all":
            self.U = [u * (self.mu / new) for u in self.U]  # the scaled dual is λ_W/μ
        self.mu = new

    # -- monitoring --
    def objective(self) -> tuple[float, list[float], list[float]]:
        """(eq. 3.6 objective, per-layer RMS ‖z_l − W_l a_{l−1} − b_l‖/√n, per-layer ‖W_l − G_l‖)."""
        n = len(self.y)
        rz, obj = [], 0.0
        for l in range(self.L):
            r = self.z[l] - self.m(l, slice(None))
            rz.append(float((r * r).sum()))
            obj += self.p.beta / 2 * rz[-1]
            if l < self.L - 1:
                obj += self.p.gamma / 2 * float(((self.a[l + 1] - torch.relu(self.z[l])) ** 2).sum())
        zl = self.z[-1]
        obj += float(st.cross_entropy_sum(zl, self.y)) + float((self.lam * (zl - self.m(self.L - 1, slice(None)))).sum())
        rw = [float(((w - g) ** 2).sum()) ** 0.5 for w, g in zip(self.W, self.G)]
        obj = obj / n + self.mu / 2 * sum(r * r for r, q in zip(rw, self.quantized) if q)
        return obj, [(r / n) ** 0.5 for r in rz], rw

    def logits_g(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass with G: what the returned model computes."""
        h = x
        for l in range(self.L):
            h = h @ self.G[l].T + self.b[l]
            if l < self.L - 1:
                h = torch.relu(h)
        return h


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    p = spec.resolve(Params)
    _check(p)
    model = copy.deepcopy(model).eval()
    pre, linears = _mlp_linears(model)
    chosen = {n for n, _ in select_layers(model, spec)}
    gen = seed_everything(spec.seed)
    if p.init == "scratch":
        for _, lin in linears:
            lin.reset_parameters()  # PyTorch's default init, drawn from the seeded global generator

    def features(x) -> torch.Tensor:
        h = torch.as_tensor(x, dtype=torch.float32)
        with torch.no_grad():
            for m in pre:
                h = m(h)
        return h.reshape(len(h), -1)

    a0, y = features(data.x_train), torch.as_tensor(data.y_train)
    xv, yv = features(data.x_val), torch.as_tensor(data.y_val)
    widths = [a0.shape[1]] + [lin.out_features for _, lin in linears]
    n = len(y)
    floats = memory_floats(n, widths)
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(p.dtype) or \
        (torch.float64 if floats <= 2_000_000 else torch.float32)
    nbytes = floats * (8 if dtype == torch.float64 else 4)
    if spec.progress:
        tqdm.write(f"qnn-admm: n={n} samples, widths {widths}: split variables ≈ n·(d0 + 2·Σhidden + 2·classes) = "
                   f"{floats:,} floats = {nbytes / 2**20:.1f} MiB ({str(dtype).removeprefix('torch.')})")
    if p.batch_size and p.batch_size < n:  # fixed blocks of a seeded permutation
        perm = torch.randperm(n, generator=gen)
        a0, y = a0[perm], y[perm]
        blocks = [slice(i, min(i + p.batch_size, n)) for i in range(0, n, p.batch_size)]
    else:
        blocks = [slice(None)]
    with torch.no_grad():
        net = _Net([lin.weight.detach() for _, lin in linears],
                   [lin.bias.detach() if lin.bias is not None else None for _, lin in linears],
                   [spec.codes_for(name) if name in chosen else None for name, _ in linears], spec.per_channel,
                   a0.to(dtype), y, p, dtype)
        return _run(model, linears, net, blocks, xv.to(dtype), yv, spec, p)


def _run(model, linears, net: _Net, blocks, xv, yv, spec: QuantSpec, p: Params) -> QuantResult:
    def score(it: int, seconds: float) -> dict:
        obj, rz, rw = net.objective()
        logits_v = net.logits_g(xv)
        return {"iter": it, "objective": obj, "res_z": rz, "res_wg": rw, "mu": net.mu,
                "train_acc": float((net.logits_g(net.a0).argmax(1) == net.y).double().mean() * 100),
                "val_acc": float((logits_v.argmax(1) == yv).double().mean() * 100),
                "val_loss": float(nn.functional.cross_entropy(logits_v, yv)), "seconds": round(seconds, 3)}

    def snapshot():
        return [g.clone() for g in net.G], [b.clone() for b in net.b], list(net.Q), list(net.alpha)

    t0 = time.perf_counter()
    history = [score(0, 0.0)]
    best_key, best, best_it = (history[0]["val_acc"], -history[0]["val_loss"]), snapshot(), 0
    bar = tqdm(range(1, p.iterations + 1), desc="qnn-admm", disable=not spec.progress, leave=False)
    for it in bar:
        for s in blocks:
            net.sweep(s)
        net.grow_mu()
        h = score(it, time.perf_counter() - t0)
        history.append(h)
        bar.set_postfix(obj=f"{h['objective']:.4g}", rz=f"{math.sqrt(sum(r * r for r in h['res_z'])):.3g}",
                        rwg=f"{math.sqrt(sum(r * r for r in h['res_wg'])):.3g}", train=f"{h['train_acc']:.1f}%",
                        val=f"{h['val_acc']:.1f}%")
        key = (h["val_acc"], -h["val_loss"])
        if key > best_key:
            best_key, best, best_it = key, snapshot(), it
        if not all(math.isfinite(v) for v in (h["objective"], *h["res_z"])):
            raise RuntimeError(f"qnn-admm diverged at iteration {it}; lower beta/gamma or mu_growth")
        if p.patience and it - best_it >= p.patience:
            break
    G, b, Q, alpha = best
    layers = {}
    with torch.no_grad():
        for l, (name, lin) in enumerate(linears):
            if net.quantized[l]:
                layers[name] = LayerCodes(Q[l], alpha[l], net.codes[l])
            else:
                lin.weight.copy_(G[l].to(lin.weight.dtype))  # a kept (float) layer: its trained W
            if lin.bias is not None:
                lin.bias.copy_(b[l].to(lin.bias.dtype))
    apply_codes(model, layers)
    history.append({"summary": True, "best_iter": best_it, "iterations_run": history[-1]["iter"],
                    "seconds": round(time.perf_counter() - t0, 3), "backtrack_capped": sum(c.capped for c in net.ups + net.theta),
                    "fista_steps": net.fista_steps})
    return QuantResult(model, layers, "qnn-admm", asdict(p), history)


METHOD = Method("qnn-admm", quantize, Params, __doc__)
