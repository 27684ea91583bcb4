"""The defining behaviour of the papers' methods (issue 12) on small problems: Mirror Descent's
annealed projection, AskewSGD's direction rule, ADMM-Q's soft and random projections."""
import pytest
import torch

from qadmm import methods
from qadmm.codes import CodeSet
from qadmm.methods.admmq import random_step, soft_step
from qadmm.methods.askewsgd import direction
from qadmm.methods.md import Mirror, softmax_weights, staircase
from qadmm.spec import QuantSpec


def levels(bits: int, scheme: str) -> torch.Tensor:
    return torch.tensor(CodeSet(bits, scheme).levels, dtype=torch.float32)


@pytest.mark.parametrize("bits,scheme", [(1, "binary"), (2, "symmetric"), (4, "symmetric"), (2, "thesis")])
def test_md_tanh_annealing_drives_the_weights_onto_the_grid(bits, scheme):
    lv = levels(bits, scheme)
    u = torch.empty(4000).uniform_(float(lv[0]) - 1, float(lv[-1]) + 1, generator=torch.Generator().manual_seed(0))
    mids = (lv[1:] + lv[:-1]) / 2
    away = (u[:, None] - mids).abs().min(1).values > 0.01  # a midpoint stays between two levels at any β
    dist = [(staircase(u, lv, beta)[away][:, None] - lv).abs().min(1).values.max().item() for beta in (1, 10, 100, 1e4)]
    assert dist == sorted(dist, reverse=True) and dist[-1] < 1e-3 < dist[0]  # monotone, ends on the grid
    nearest = lv[(u[:, None] - lv).abs().argmin(1)]
    assert torch.allclose(staircase(u, lv, 1e4)[away], nearest[away], atol=1e-4)  # β → ∞ is rounding
    if scheme == "binary":
        assert torch.allclose(staircase(u, lv, 3.0), torch.tanh(3.0 * u), atol=1e-6)  # the paper's tanh(βũ)


@pytest.mark.parametrize("bits,scheme", [(1, "binary"), (2, "symmetric"), (8, "symmetric"), (3, "thesis")])
def test_md_staircase_window_is_the_full_sum(bits, scheme):
    """Evaluating only the steps near u gives the full Σ_j over every level step, at every β."""
    lv = levels(bits, scheme)
    u = torch.empty(3000).uniform_(float(lv[0]) - 2, float(lv[-1]) + 2, generator=torch.Generator().manual_seed(6))
    for beta in (0.3, 1.0, 7.0, 100.0, 1e4):
        steps, mids = lv[1:] - lv[:-1], (lv[1:] + lv[:-1]) / 2
        full = lv[0] + (steps * (1 + torch.tanh(beta * (u[:, None] - mids))) / 2).sum(-1)
        assert torch.allclose(staircase(u, lv, beta), full, atol=1e-4 * max(1, len(lv) / 16)), beta


def test_md_softmax_annealing_picks_the_argmax_level():
    lv = levels(2, "symmetric")
    u = torch.randn(500, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(softmax_weights(u, lv, 1e4), lv[u.argmax(1)], atol=1e-4)
    soft = softmax_weights(u, lv, 0.5)
    assert (soft.abs() < 1).all() and not torch.allclose(soft, lv[u.argmax(1)])


def test_md_gradient_goes_straight_to_the_auxiliary_variable():
    """The "-S" update: ∂L/∂ũ = ∂L/∂P_β(ũ) (times α), with no tanh′ factor that would vanish as β grows."""
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    alpha = torch.tensor(0.7)
    for kind in ("tanh", "softmax"):
        m = Mirror(kind, w, alpha, CodeSet(1, "binary"), beta0=1.0)
        g = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
        (m.weight(1e6) * g).sum().backward()
        want = alpha * g if kind == "tanh" else alpha * g[..., None] * levels(1, "binary")
        assert torch.allclose(m.u.grad, want), kind


def test_md_warm_start_reproduces_the_float_weights():
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(4)) * 0.3
    m = Mirror("tanh", w, torch.tensor(0.5), CodeSet(2, "symmetric"), beta0=1.0)
    assert torch.allclose(m.soft(1.0), w.clamp(-0.495, 0.495), atol=1e-5)


def test_md_run_ends_on_the_grid_and_records_it(digits, digits_mlp):
    res = methods.quantize("md-tanh", digits_mlp, digits, QuantSpec(bits=1, params={"epochs": 10}, progress=False))
    final = res.history[-1]
    assert final["on_grid_fraction"] > 0.95 and res.params["final_beta"] == pytest.approx(1e3)


def test_askew_direction_keeps_feasible_gradients_and_pushes_infeasible_weights_back():
    lv = levels(1, "binary")  # g(u) = ε − (u + 1)²(u − 1)² = ε − (u² − 1)²
    u = torch.tensor([0.95, -0.2, 0.5, 0.5, 1.0])
    grad = torch.tensor([0.3, 0.3, -2.0, 0.4, 5.0])
    eps = 0.05  # feasible: (u² − 1)² ≤ 0.05, i.e. |u| within about ±0.11 of ±1
    d = direction(u, grad, lv, eps, rate=1.0, clip=100.0)
    assert d[0] == -grad[0]  # feasible: the gradient is untouched
    assert d[4] == -grad[4]  # exactly on a level
    assert d[1] != -grad[1] and d[1] < 0  # infeasible: sent towards -1, the nearer level
    assert d[3] != -grad[3] and d[3] > 0  # infeasible, the gradient pulls away from +1: K instead
    assert d[2] == -grad[2]  # infeasible but −∇f already moves towards the grid faster than K: kept
    x = torch.tensor([0.5, -0.3, 0.2, -0.7])
    g = [eps - (x**2 - 1) ** 2]
    for _ in range(1000):  # following the rule with a zero loss gradient: g rises at rate ≥ −rate·g to the band
        x = x + 0.01 * direction(x, torch.zeros_like(x), lv, eps, rate=1.0, clip=25.0)
        g.append(eps - (x**2 - 1) ** 2)
    assert all((b >= a - 1e-7).all() for a, b in zip(g, g[1:])) and (g[-1] >= -1e-4).all() and (g[0] < -0.1).all(), x


def test_admmq_random_projection_updates_about_p_of_the_entries():
    old, new = torch.zeros(20000), torch.ones(20000)
    for p in (0.1, 0.3, 0.9):
        share = float(random_step(old, new, p, torch.Generator().manual_seed(0)).mean())
        assert abs(share - p) < 0.02, (p, share)


def test_admmq_soft_projection_moves_by_at_most_the_step():
    z = torch.randn(50, generator=torch.Generator().manual_seed(5))
    target = torch.sign(z)
    y = soft_step(z, target, 0.5)
    assert float((y - z).norm()) == pytest.approx(0.5, rel=1e-5)  # exactly the step towards the projection
    assert torch.allclose((y - z) / 0.5, (target - z) / (target - z).norm(), atol=1e-6)
    assert torch.equal(soft_step(z, target, 1e6), target)  # within reach: the projection itself


def test_new_method_parameters_are_checked():
    from qadmm.errors import UserError

    for name, params in (("admm-q", {"random": 1.5}), ("md-tanh", {"beta0": 10.0, "beta_end": 5.0}),
                         ("askewsgd", {"eps_end": 2.0})):
        with pytest.raises(UserError):
            methods.check(name, QuantSpec(params=params))


def test_schedules_run_over_steps_so_one_epoch_still_anneals(digits, digits_mlp):
    """Step hooks see t, the share of the run's steps done, reach exactly 1 at the last step; a
    1-epoch ADMM-Q run makes all its G/λ updates and ends at rho_end (per epoch, it stayed at its first
    ρ and a 1-epoch CNN run lost 66 points to the hard rounding: docs/paper-methods.md)."""
    import copy

    from qadmm.finetune import Hooks, Projector, finetune, run_steps

    seen = []
    model = copy.deepcopy(digits_mlp)
    spec = QuantSpec(bits=2, progress=False)
    finetune(model, digits, spec, Projector(model, spec), epochs=2, lr=1e-3, batch_size=32, desc="t",
             hooks=Hooks(after_step=seen.append))
    assert len(seen) == run_steps(len(digits.x_train), 2, 32)
    assert seen == sorted(seen) and seen[-1] == 1.0 and seen[0] == 1 / len(seen)
    admm = methods.quantize("admm-q", digits_mlp, digits, QuantSpec(bits=2, params={"epochs": 1}, progress=False))
    assert admm.params["updates"] == 30 and admm.params["final_rho"] == pytest.approx(admm.params["rho_end"])
