"""QNN-ADMM: each subproblem solver against a brute-force or closed-form answer on tiny problems,
the whole method on digits, and the CLI end to end."""

import pytest
import torch

from qadmm import admm_steps as st
from qadmm.errors import UserError
from qadmm.methods import qnn_admm
from qadmm.spec import QuantSpec
from qadmm.train import accuracy
from qexport.artifact import load_artifact
from tests_helpers import run_cli

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("beta,gamma", [(1.0, 1.0), (0.3, 5.0), (5.0, 0.2)])
def test_z_hidden_step_matches_grid_search(beta, gamma):
    g = gen(1)
    m, a = 3 * torch.randn(80, dtype=D, generator=g), 2 * torch.randn(80, dtype=D, generator=g).abs() * (torch.rand(80, generator=g) > 0.2)
    z = st.z_hidden_step(m, a, beta, gamma)

    def obj(z):
        return beta / 2 * (z - m) ** 2 + gamma / 2 * (a - torch.relu(z)) ** 2

    grid = torch.linspace(-12, 12, 120001, dtype=D)[:, None]  # step 2e-4
    best = (beta / 2 * (grid - m) ** 2 + gamma / 2 * (a - torch.relu(grid)) ** 2).min(0).values
    assert (obj(z) <= best + 1e-9).all()
    assert (obj(z) >= best - 1e-5).all()  # and the grid is fine enough to be a real check


def _wproblem(seed=0):
    g = gen(seed)
    a = torch.relu(torch.randn(50, 6, dtype=D, generator=g))
    W, G = torch.randn(4, 6, dtype=D, generator=g), torch.randn(4, 6, dtype=D, generator=g)
    t, b = torch.randn(50, 4, dtype=D, generator=g), torch.randn(4, dtype=D, generator=g)
    return W, G, a, t, b


def test_w_step_decreases_its_objective_and_carries_the_curvature():
    W, G, a, t, b = _wproblem()
    curv = st.Curvature(1e-3, 2.0, 40)  # far too small: must backtrack
    j = [st.w_objective(W, G, a, t, b, 0.02, 0.5)]
    for _ in range(12):  # beyond ~15 steps the changes are at rounding level
        W = st.w_step(W, G, a, t, b, 0.02, 0.5, curv)
        j.append(st.w_objective(W, G, a, t, b, 0.02, 0.5))
    assert all(x1 <= x0 + 1e-12 for x0, x1 in zip(j, j[1:])) and j[-1] < 0.5 * j[0]
    assert curv.value > 1e-3 and curv.capped == 0  # the found υ is kept for the next call
    Wx, bx = st.w_exact(G, a, t - b, 0.02, 0.5, with_bias=False)  # b fixed: target t - b
    assert j[-1] >= st.w_objective(Wx, G, a, t, b, 0.02, 0.5) - 1e-12  # nothing beats the exact minimiser
    grad = -0.02 * (t - a @ Wx.T - b).T @ a + 0.5 * (Wx - G)  # eq. 4.3: zero gradient
    assert grad.abs().max() < 1e-8 and torch.equal(bx, torch.zeros(4, dtype=D))


def test_w_step_cap_keeps_the_old_point():
    W, G, a, t, b = _wproblem(3)
    curv = st.Curvature(1e-6, 2.0, 2)
    assert torch.equal(st.w_step(W, G, a, t, b, 0.02, 0.5, curv), W) and curv.capped == 1


def test_w_exact_with_bias_matches_lstsq():
    W, G, a, t, b = _wproblem(2)
    beta_n, mu = 0.02, 0.5
    Wx, bx = st.w_exact(G, a, t, beta_n, mu, with_bias=True)
    # the same problem as one least squares: rows sqrt(β_n)[a 1] -> t, and sqrt(μ)[I 0] -> G
    A = torch.cat([beta_n**0.5 * torch.cat([a, torch.ones(50, 1, dtype=D)], 1),
                   mu**0.5 * torch.cat([torch.eye(6, dtype=D), torch.zeros(6, 1, dtype=D)], 1)])
    B = torch.cat([beta_n**0.5 * t, mu**0.5 * G.T])
    sol = torch.linalg.lstsq(A, B).solution.T
    assert torch.allclose(Wx, sol[:, :6], atol=1e-9) and torch.allclose(bx, sol[:, 6], atol=1e-9)
    assert torch.allclose(st.bias_step(Wx, a, t), bx, atol=1e-9)  # the closed-form bias step agrees


def test_a_step_decreases_its_objective_towards_the_closed_form():
    g = gen(4)
    a, hz = torch.randn(30, 5, dtype=D, generator=g), torch.relu(torch.randn(30, 5, dtype=D, generator=g))
    Wn, bn, t = torch.randn(3, 5, dtype=D, generator=g), torch.randn(3, dtype=D, generator=g), torch.randn(30, 3, dtype=D, generator=g)
    curv = st.Curvature(1.0, 2.0, 30)
    j = [st.a_objective(a, hz, t, Wn, bn, 2.0, 1.0)]
    for _ in range(200):  # to convergence: compare decreases with a rounding allowance
        a = st.a_step(a, hz, t, Wn, bn, 2.0, 1.0, curv)
        j.append(st.a_objective(a, hz, t, Wn, bn, 2.0, 1.0))
    assert all(x1 <= x0 + 1e-10 * j[0] for x0, x1 in zip(j, j[1:])) and j[1] < j[0]
    ax = st.a_exact(hz, t, Wn, bn, 2.0, 1.0)  # eq. 4.27
    assert abs(j[-1] - st.a_objective(ax, hz, t, Wn, bn, 2.0, 1.0)) < 1e-6 * j[0]
    grad = -2.0 * (t - ax @ Wn.T - bn) @ Wn + 1.0 * (ax - hz)
    assert grad.abs().max() < 1e-10


@pytest.mark.parametrize("beta", [0.05, 1.0, 10.0])
def test_fista_matches_lbfgs(beta):
    g = gen(5)
    y = torch.randint(0, 4, (20,), generator=g)
    m, lam = 3 * torch.randn(20, 4, dtype=D, generator=g), 0.3 * torch.randn(20, 4, dtype=D, generator=g)
    z, steps = st.z_last_step(m.clone(), m, y, lam, beta, max_iter=5000, tol=1e-12)
    ref = m.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([ref], max_iter=2000, tolerance_grad=1e-13, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = st.cross_entropy_sum(ref, y) + (lam * (ref - m)).sum() + beta / 2 * ((ref - m) ** 2).sum()
        f.backward()
        return f

    opt.step(closure)
    assert torch.allclose(z, ref.detach(), atol=1e-6), (z - ref).abs().max()
    assert st.z_last_objective(z, m, y, lam, beta) <= st.z_last_objective(ref.detach(), m, y, lam, beta) + 1e-9
    assert steps < 5000


def test_fista_is_stable_for_huge_logits():
    y = torch.tensor([0, 1])
    m = torch.tensor([[1e4, -1e4], [5e3, 0.0]], dtype=torch.float32)
    z, _ = st.z_last_step(m.clone(), m, y, torch.zeros_like(m), 1.0)
    assert torch.isfinite(z).all() and torch.isfinite(st.cross_entropy_sum(z, y))


def test_lambda_step_is_dual_ascent_and_satisfies_the_kkt_identity():
    g = gen(6)
    y = torch.randint(0, 3, (10,), generator=g)
    m, lam = torch.randn(10, 3, dtype=D, generator=g), torch.randn(10, 3, dtype=D, generator=g)
    z, _ = st.z_last_step(m.clone(), m, y, lam, 2.0, max_iter=10000, tol=1e-14)
    new = st.lambda_step(lam, z, m, 2.0)
    assert torch.allclose(new, lam + 2.0 * (z - m))  # eq. 4.41
    # z minimises CE + ⟨λ, z⟩ + β/2‖z − m‖², so the updated λ is minus the CE gradient at z
    onehot = torch.nn.functional.one_hot(y, 3).to(D)
    assert torch.allclose(new, -(torch.softmax(z, 1) - onehot), atol=1e-8)


def test_objective_decreases_over_the_first_iterations(digits, digits_mlp):
    # the thesis configuration: one multiplier, linearised steps, constant μ
    res = qnn_admm.quantize(digits_mlp, digits, QuantSpec(bits=2, scheme="thesis", progress=False, params={
        "iterations": 4, "patience": 0, "multipliers": "output", "solver": "linearized", "mu_growth": 1.0}))
    obj = [h["objective"] for h in res.history if "objective" in h]
    assert len(obj) == 5 and all(b < a for a, b in zip(obj, obj[1:])), obj
    assert res.history[-1]["summary"] and res.history[-1]["backtrack_capped"] == 0


def test_refuses_models_that_are_not_mlps(digits):
    from qadmm.zoo import build_model

    cnn = build_model("cnn-small", digits.input_shape, digits.num_classes, digits.mean, digits.std)
    with pytest.raises(UserError, match="MLPs only.*Linear, ReLU.*Conv2d"):
        qnn_admm.quantize(cnn, digits, QuantSpec(bits=2, progress=False))
    with pytest.raises(UserError, match="solver"):
        qnn_admm.quantize(cnn, digits, QuantSpec(bits=2, progress=False, params={"solver": "newton"}))


def test_cli_digits_two_bits(tmp_path, digits, digits_mlp):
    from qexport.checkpoint import save_checkpoint
    from qexport.workflow import preprocessing

    ck = tmp_path / "digits.safetensors"
    save_checkpoint(ck, digits_mlp, {"architecture": {"model": "mlp-digits", "input_shape": list(digits.input_shape),
                                                      "num_classes": digits.num_classes}, "preprocessing": preprocessing(digits)})
    out_path = tmp_path / "d.qx.safetensors"
    out = run_cli(["quantize", "--data", "digits", "--checkpoint", str(ck), "--method", "qnn-admm", "--bits", "2",
                   "--param", "iterations=25", "-q", "-o", str(out_path)])
    art = load_artifact(out_path)
    acc = art.meta["accuracy"]["quantized_test"]
    assert acc > 88, out  # PTQ at 2 bits: about 80%; float about 96%
    assert art.meta["method"]["name"] == "qnn-admm" and art.meta["method"]["params"]["iterations"] == 25
    hist = art.meta["history"]
    assert hist[-1]["summary"] and {"objective", "res_z", "res_wg", "train_acc"} <= set(hist[1])
    for name, lc in art.layers.items():  # every Linear quantized, weights exactly α·Q
        assert lc.codes.contains(lc.q)
    assert abs(accuracy(art.model, digits.x_test, digits.y_test) - acc) < 1e-9
