"""LQ (layerwise ADMM, thesis ch. 5): the ADMM pieces on small problems, the layer order and
freezing, and the end-to-end gain over PTQ on real digits data."""
import copy

import pytest
import torch

from qadmm import methods
from qadmm.codes import CodeSet
from qadmm.errors import UserError
from qadmm.methods import lq
from qadmm.spec import QuantSpec
from qadmm.train import accuracy, seed_everything
from qadmm.zoo import build_model

FAST = lq.Params(iters=8, inner_epochs=0.5, retrain_epochs=1, min_steps=10)


def admm(model, digits, name, codes, per_channel, p):
    """lq.admm_layer from the thesis's G⁰ (PTQ's fit), on uncached inputs."""
    g0 = lq.start_codes(model, name, codes, per_channel, None)
    return lq.admm_layer(model, lq.Inputs(model, digits, cache=False), name, g0, per_channel, p, seed_everything(0))


def test_admm_primal_residual_shrinks(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    p = lq.Params(iters=10, inner_epochs=0.25, tol=0.0, rho=1.0, rho_growth=2.0, lr=3e-3, min_steps=10)
    lc, log = admm(model, digits, "body.1", CodeSet(1, "binary"), False, p)
    r = log["residuals"]
    assert len(r) == 10 and log["rounds"] == 10
    # growing ρ pulls W onto the code set: the relative residual ‖W − G‖/‖W‖ falls by far
    assert all(b <= a * 1.02 for a, b in zip(r, r[1:])), r  # (almost) monotone
    assert r[-1] < 0.25 * r[0] and r[-1] < 0.15, r


def test_admm_stops_at_tolerance(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    p = lq.Params(iters=50, inner_epochs=0.25, tol=0.05, rho_growth=2.0, min_steps=10)
    _, log = admm(model, digits, "body.1", CodeSet(4, "thesis"), False, p)
    assert log["rounds"] < 50 and log["residual"] < 0.05


@pytest.mark.parametrize("bits,scheme,per_channel", [(1, "binary", False), (1, "thesis", False), (2, "symmetric", True)])
def test_g_step_codes_in_the_set_and_weight_is_alpha_q(digits, digits_mlp, bits, scheme, per_channel):
    model = copy.deepcopy(digits_mlp)
    codes = CodeSet(bits, scheme)
    lc, _ = admm(model, digits, "body.3", codes, per_channel, FAST)
    assert codes.contains(lc.q) and lc.q.dtype == codes.storage_dtype
    assert lc.alpha.shape == ((64,) if per_channel else ()) and (lc.alpha > 0).all()
    assert torch.equal(dict(model.named_modules())["body.3"].weight, lc.weight())


def test_stage_splits_in_forward_order(digits, digits_mlp):
    st = lq.stage(digits_mlp, "body.3")
    m = dict(digits_mlp.named_modules())
    assert st.weight is m["body.3"].weight and st.bias is m["body.3"].bias
    assert [id(t) for t in st.later] == [id(m["body.3"].bias), id(m["body.5"].weight), id(m["body.5"].bias)]
    assert m["body.1"] in st.frozen_modules and m["body.5"] not in st.frozen_modules


def test_retraining_touches_only_later_layers_and_batchnorm_after(digits):
    seed_everything(0)
    model = build_model("cnn-small", digits.input_shape, digits.num_classes, digits.mean, digits.std)
    convs = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    before = copy.deepcopy(model.state_dict())
    lq.retrain_later(model, lq.Inputs(model, digits, cache=False), convs[1], epochs=1, lr=1e-2, batch_size=64,
                     gen=seed_everything(0))
    after = model.state_dict()
    st = lq.stage(model, convs[1])
    later = {id(t) for t in st.later}
    names_later = {n for n, t in model.named_parameters() if id(t) in later}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # everything up to and including the second conv's weight, BatchNorm statistics too, is bit-identical
    assert not any(k.startswith(("body.0.", "body.1.")) for k in changed), changed
    assert f"{convs[1]}.weight" not in changed
    assert changed and changed <= names_later | {k for k in before if "running" in k or "num_batches" in k}
    # and the BatchNorm after the second conv did learn (parameters and statistics)
    bn_after = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)][1]
    assert f"{bn_after}.weight" in changed and f"{bn_after}.running_mean" in changed


def test_quantize_fixes_layers_in_order_and_keeps_first_float(digits, digits_mlp):
    spec = QuantSpec(bits=2, keep_first=True, progress=False, params={"iters": 3, "inner_epochs": 0.5, "retrain_epochs": 1})
    res = methods.quantize("lq", digits_mlp, digits, spec)
    assert list(res.layers) == ["body.3", "body.5"]
    assert [r["layer"] for r in res.history] == ["body.3", "body.5"]
    m = dict(res.model.named_modules())
    # the kept first layer never moves (it sits before every quantized layer)
    assert torch.equal(m["body.1"].weight, dict(digits_mlp.named_modules())["body.1"].weight)
    for name, lc in res.layers.items():
        assert torch.equal(m[name].weight, lc.weight())
    row = res.history[0]
    assert {"residual", "val_acc", "val_loss", "rounds"} <= set(row) and 0 <= row["val_acc"] <= 100


def test_bad_hyperparameters_are_refused(digits, digits_mlp):
    with pytest.raises(UserError, match="rho_growth"):
        methods.quantize("lq", digits_mlp, digits, QuantSpec(bits=2, progress=False, params={"rho_growth": 0.5}))


def test_lq_beats_ptq_at_two_bits_on_digits(digits, digits_mlp):
    """The point of LQ: at ternary codes the plain projection loses a lot, LQ recovers most of it."""
    ptq = methods.quantize("ptq", digits_mlp, digits, QuantSpec(bits=2, progress=False))
    res = methods.quantize("lq", digits_mlp, digits, QuantSpec(bits=2, progress=False))  # defaults
    a_float = accuracy(digits_mlp, digits.x_test, digits.y_test)
    a_ptq, a_lq = accuracy(ptq.model, digits.x_test, digits.y_test), accuracy(res.model, digits.x_test, digits.y_test)
    # PTQ loses about 4 points here; LQ must win back most of them
    assert a_lq >= a_ptq + 2 and a_lq >= a_float - 1.5, (a_float, a_ptq, a_lq)


def test_input_cache_feeds_the_later_units_what_the_whole_model_computes(digits, digits_cnn):
    model = build_model("resnet20", digits.input_shape, digits.num_classes, digits.mean, digits.std).eval()
    inputs = lq.Inputs(model, digits, cache=True)
    full = model(torch.as_tensor(digits.x_train[:64]))
    for name in ("body.0", "body.4.conv2", "body.7.shortcut.0", "body.11"):
        inputs.advance_to(name)
        with torch.no_grad():
            assert torch.allclose(inputs.runner.eval()(inputs.x[:64]), full, atol=1e-4), name
        assert any(name == n or name.startswith(n + ".") for n, _ in inputs.units[inputs.k:inputs.k + 1])
    assert inputs.x.shape[1:] == (64, 2, 2)  # the last block's output feeds pooling and the head


def test_budget_fits_the_schedule_and_records_it(digits, digits_cnn):
    res = methods.quantize("lq", digits_cnn, digits, QuantSpec(bits=4, per_channel=True, progress=False, params={
        "budget_epochs": 3, "iters": 2, "min_steps": 1, "warm_start": "gptq"}))
    assert res.params["inner_epochs"] == pytest.approx(3 / 3 * 0.75 / 2)
    assert res.params["retrain_epochs"] == pytest.approx(3 / 3 * 0.25)
    assert [r["rounds"] for r in res.history] == [2, 2, 2]
    assert accuracy(res.model, digits.x_test, digits.y_test) > 85


def test_kept_round_restores_batchnorm_statistics_with_the_later_layers(digits, digits_cnn):
    """The round LQ keeps is scored with the later BatchNorm statistics of that round: restoring the
    parameters alone (statistics left from the last round) made the kept model differ from the scored one."""
    model = copy.deepcopy(digits_cnn)
    p = lq.Params(iters=4, inner_epochs=1.0, min_steps=10, rho_growth=1.0)
    inputs = lq.Inputs(model, digits, cache=True)
    inputs.advance_to("body.0")
    g0 = lq.start_codes(model, "body.0", CodeSet.default(2), True, None)
    _, log = lq.admm_layer(model, inputs, "body.0", g0, True, p, seed_everything(0))
    assert inputs.score()[0] == pytest.approx(log["val_acc_fixed"])
