"""The subproblem solvers of QNN-ADMM (thesis chapter 4), as pure functions on tensors.

Layout: samples are rows. For layer l, a_{l-1} is (n, in), W_l is (out, in) as in nn.Linear, b_l is
(out,), z_l = a_{l-1} W_lᵀ + b_l is (n, out). At the output layer the multiplier term is folded into
the target by completing the square: ⟨λ, z_L − m⟩ + β/2‖z_L − m‖² = β/2‖(z_L + λ/β) − m‖² − ‖λ‖²/2β,
so the W_L, b_L and a_{L−1} steps see the target z_L + λ/β and otherwise equal the hidden ones.

Penalties over samples are divided by n in the W-step (`beta_n` = β/n) so that β, γ and μ mean the
same on 150 samples as on 60 000 (the dlADMM code sums over samples and retunes ρ per data set).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Curvature:
    """A backtracking curvature (υ for W, θ for a) carried from one call to the next: each call
    first tries value/scale (a longer step), then multiplies by `scale` until the quadratic model
    bounds the objective, at most `max_doublings` times."""

    value: float = 1.0
    scale: float = 2.0  # κ (W) or τ (a), > 1
    max_doublings: int = 30
    capped: int = 0  # calls that hit the cap (and kept the old point)


def _backtrack(j0: float, gg: float, j_at, curv: Curvature) -> float | None:
    """Smallest tried curvature c with j_at(c) <= ψ = j0 − ‖g‖²/(2c) (eq. 4.5 / 4.28 at the step
    point of eq. 4.9 / 4.32); None when the cap is hit or the gradient vanishes."""
    if gg <= 0.0:
        return None
    c = max(curv.value / curv.scale, 1e-12)
    for _ in range(curv.max_doublings + 1):
        if j_at(c) <= j0 - gg / (2 * c) + 1e-12 * max(abs(j0), 1.0):
            curv.value = c
            return c
        c *= curv.scale
    curv.capped += 1
    return None


def _linearized_step(x, g, r, p, d, w_r: float, w_d: float, curv: Curvature) -> torch.Tensor:
    """x − g/c, c backtracked (eq. 4.9 / 4.32) on J(x − s·g) = w_r/2‖r + s·p‖² + w_d/2‖d − s·g‖².

    Both the W- and the a-subproblem have this form (r the linear residual, p its change per unit
    step, d the distance to the proximal target), so J along the step is a quadratic in s = 1/c
    whose six coefficients cost one pass: every backtracking trial is then O(1).
    """
    rr, rp, pp = float((r * r).sum()), float((r * p).sum()), float((p * p).sum())
    dd, dg, gg = float((d * d).sum()), float((d * g).sum()), float((g * g).sum())

    def j_at(c: float) -> float:
        s = 1.0 / c
        return w_r / 2 * (rr + 2 * s * rp + s * s * pp) + w_d / 2 * (dd - 2 * s * dg + s * s * gg)

    c = _backtrack(j_at(math.inf), gg, j_at, curv)
    return x if c is None else x - g / c


def w_objective(W, G, a_prev, target, b, beta_n: float, mu: float) -> float:
    """J_w (eq. 4.1): β/2n ‖target − a W ᵀ − b‖² + μ/2 ‖W − G‖²."""
    r = target - a_prev @ W.T - b
    return float(beta_n / 2 * (r * r).sum() + mu / 2 * ((W - G) ** 2).sum())


def w_step(W, G, a_prev, target, b, beta_n: float, mu: float, curv: Curvature) -> torch.Tensor:
    """One linearised step W − ∇J_w/υ with backtracking on υ (Algorithm 3, eq. 4.9-4.10).

    J_w is quadratic, so J_w(W − g/υ) is a quadratic in 1/υ whose three coefficients cost one
    product P = a gᵀ: each backtracking trial is then O(1) instead of a pass over the data.
    """
    r = target - a_prev @ W.T - b  # (n, out)
    d = W - G
    g = -beta_n * (r.T @ a_prev) + mu * d  # eq. 4.10
    p = a_prev @ g.T  # residual change per unit step: r(W − s g) = r + s P
    return _linearized_step(W, g, r, p, d, beta_n, mu, curv)


def bias_step(W, a_prev, target) -> torch.Tensor:
    """Closed-form bias (the b-step of dlADMM): b = mean over samples of target − a Wᵀ."""
    return (target - a_prev @ W.T).mean(0)


def z_hidden_step(m, a, beta: float, gamma: float) -> torch.Tensor:
    """Exact elementwise minimiser of β/2(z − m)² + γ/2(a − relu(z))² (Algorithm 5, eq. 4.21-4.25).

    Branch z >= 0: z1 = max((βm + γa)/(β + γ), 0); branch z <= 0: z2 = min(m, 0); keep the one with
    the smaller objective (z = 0 belongs to both branches, so an entry whose unconstrained branch
    optima both fall outside gets 0, the thesis's "critical value").
    """
    z1 = torch.clamp((beta * m + gamma * a) / (beta + gamma), min=0)
    z2 = torch.clamp(m, max=0)
    e1 = beta / 2 * (z1 - m) ** 2 + gamma / 2 * (a - z1) ** 2
    e2 = beta / 2 * (z2 - m) ** 2 + gamma / 2 * a**2
    return torch.where(e1 <= e2, z1, z2)


def a_objective(a, hz, target_next, W_next, b_next, beta: float, gamma: float) -> float:
    """J_a (eq. 4.26): β/2‖target − a Wᵀ − b‖² + γ/2‖a − h(z_l)‖²."""
    r = target_next - a @ W_next.T - b_next
    return float(beta / 2 * (r * r).sum() + gamma / 2 * ((a - hz) ** 2).sum())


def a_step(a, hz, target_next, W_next, b_next, beta: float, gamma: float, curv: Curvature) -> torch.Tensor:
    """One linearised step a − ∇J_a/θ with backtracking on θ (Algorithm 6, eq. 4.32-4.33)."""
    r = target_next - a @ W_next.T - b_next
    d = a - hz
    g = -beta * (r @ W_next) + gamma * d  # eq. 4.33
    p = g @ W_next.T  # r(a − s g) = r + s p
    return _linearized_step(a, g, r, p, d, beta, gamma, curv)


def cross_entropy_sum(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_i −log softmax(z_i)[y_i] via log-sum-exp (no overflow for large logits)."""
    return (torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]).sum()


def z_last_objective(z, m, y, lam, beta: float) -> float:
    """CE(z, y) + ⟨λ, z − m⟩ + β/2‖z − m‖² (eq. 4.34), summed over samples."""
    return float(cross_entropy_sum(z, y) + (lam * (z - m)).sum() + beta / 2 * ((z - m) ** 2).sum())


def z_last_step(z0, m, y, lam, beta: float, max_iter: int = 50, tol: float = 1e-6, eta: float = 0.5) -> tuple[torch.Tensor, int]:
    """FISTA on CE(z, y) + ⟨λ, z⟩ with the exact prox of β/2‖z − m‖² (Algorithm 7, eq. 4.39-4.40).

    η = 1/2 bounds the curvature of softmax cross-entropy per row, so the step never overshoots.
    Stops when no entry moves by more than `tol` or after `max_iter` steps; returns (z, steps).
    """
    onehot = torch.zeros_like(z0).scatter_(1, y[:, None], 1.0)
    z_prev = z0
    zh = z0
    t = 1.0
    for s in range(1, max_iter + 1):
        grad = torch.softmax(zh, 1) - onehot + lam  # eq. 4.40
        z = (eta * zh + beta * m - grad) / (eta + beta)  # eq. 4.39
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        zh = z + (t - 1) / t_next * (z - z_prev)
        moved = float((z - z_prev).abs().max()) if z.numel() else 0.0
        z_prev, t = z, t_next
        if moved < tol:
            return z, s
    return z_prev, max_iter


def lambda_step(lam, z_last, m_last, beta: float) -> torch.Tensor:
    """Dual ascent on the output constraint z_L = W_L a_{L−1} + b_L (eq. 4.41)."""
    return lam + beta * (z_last - m_last)


def w_exact(G, a_prev, target, beta_n: float, mu: float, with_bias: bool, gram: torch.Tensor | None = None):
    """Exact joint minimiser over (W, b) of β/2n‖target − a Wᵀ − b‖² + μ/2‖W − G‖² (eq. 4.4 with the
    bias appended as a constant input). `gram` = [a 1]ᵀ[a 1] may be passed in (a_0 never changes).
    Returns (W, b); b = 0 when `with_bias` is False."""
    n, d = a_prev.shape
    A = torch.cat([a_prev, torch.ones(n, 1, dtype=a_prev.dtype)], 1) if with_bias else a_prev
    M = beta_n * (gram if gram is not None else A.T @ A)
    M = M + torch.diag(torch.tensor([mu] * d + [0.0] * (A.shape[1] - d), dtype=A.dtype))
    M = M + 1e-10 * M.diagonal().abs().max().clamp_min(1e-30) * torch.eye(A.shape[1], dtype=A.dtype)  # keeps it PD when mu = 0
    rhs = beta_n * (target.T @ A)
    rhs[:, :d] += mu * G
    theta = torch.linalg.solve(M, rhs.T).T  # M is symmetric
    return theta[:, :d], (theta[:, d] if with_bias else torch.zeros(G.shape[0], dtype=G.dtype))


def a_exact(hz, target_next, W_next, b_next, beta: float, gamma: float) -> torch.Tensor:
    """Exact minimiser of J_a (eq. 4.27): a = (βWᵀW + γI)⁻¹(βWᵀ(target − b) + γh(z)), row by row."""
    M = beta * W_next.T @ W_next + gamma * torch.eye(W_next.shape[1], dtype=W_next.dtype)
    rhs = beta * (target_next - b_next) @ W_next + gamma * hz
    return torch.linalg.solve(M, rhs.T).T
