"""Calibration-only back-ends (gptq, ldnq) and the recalibration steps (BatchNorm re-estimation, bias correction)."""
import copy

import pytest
import torch

from qadmm import methods
from qadmm.codes import CodeSet, fit
from qadmm.layer_inputs import as_rows, input_hessian, input_mean, weight_matrix
from qadmm.layerwise import output_error
from qadmm.methods.gptq import GPTQ, Params as GPTQParams
from qadmm.methods.ldnq import Params as LDNQParams, admm_layer
from qadmm.recalibrate import batchnorms, correct_bias, reestimate_bn
from qadmm.spec import QuantSpec
from qadmm.train import accuracy
from tests_helpers import run_cli


def layer_and_hessian(model, data, name):
    m = dict(model.named_modules())[name]
    return m, weight_matrix(m), input_hessian(model, m, data.calibration(1024))


def test_unfolded_rows_reproduce_the_convolution(digits_cnn, digits):
    conv = digits_cnn.body[4]
    x = torch.randn(3, 16, 4, 4)
    y = conv(x)  # (3, 32, 4, 4)
    rows = as_rows(conv, x)  # (3·16 positions, 16·9)
    y_rows = rows @ weight_matrix(conv).T
    assert torch.allclose(y_rows.reshape(3, 16, 32).transpose(1, 2).reshape(y.shape), y, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 2, 1])
@pytest.mark.parametrize("name", ["body.0", "body.4", "body.9"])
def test_gptq_error_feedback_beats_nearest_rounding_on_the_layer_output(digits_cnn, digits, name, bits):
    _, w, h = layer_and_hessian(digits_cnn, digits, name)
    codes = CodeSet.default(bits)
    q, alpha = GPTQ(w, h).quantize(codes, True, GPTQParams(refit_scale=False))
    assert codes.contains(q)
    nearest = fit(w, codes, per_channel=True)
    # same scales (no refit), other rounding: the error feedback alone lowers the output error
    assert torch.allclose(alpha.float(), nearest.alpha)
    err_gptq = output_error(w - q * alpha[:, None], h)
    err_nearest = output_error(w - nearest.dequantize(), h)
    assert err_gptq < err_nearest, (err_gptq, err_nearest)
    if name == "body.4":  # 144 columns to push errors onto: far lower (measured 0.2-0.3 of nearest)
        assert err_gptq < 0.5 * err_nearest, (err_gptq, err_nearest)


def test_gptq_in_activation_order_rounds_every_column_and_beats_nearest(digits_cnn, digits):
    _, w, h = layer_and_hessian(digits_cnn, digits, "body.4")
    codes = CodeSet.default(3)
    q, alpha = GPTQ(w, h).quantize(codes, True, GPTQParams(refit_scale=False, act_order=True, block_size=16))
    assert codes.contains(q) and q.shape == w.shape
    assert output_error(w - q * alpha[:, None], h) < output_error(w - fit(w, codes, per_channel=True).dequantize(), h)


def test_gptq_scale_refit_never_raises_the_output_error(digits_cnn, digits):
    _, w, h = layer_and_hessian(digits_cnn, digits, "body.4")
    codes = CodeSet.default(3)
    for per_channel in (True, False):
        q0, a0 = GPTQ(w, h).quantize(codes, per_channel, GPTQParams(refit_scale=False))
        q1, a1 = GPTQ(w, h).quantize(codes, per_channel, GPTQParams(refit_scale=True))
        assert torch.equal(q0, q1)
        deq = (lambda q, a: q * (a[:, None] if per_channel else a))
        assert output_error(w - deq(q1, a1), h) <= output_error(w - deq(q0, a0), h) * (1 + 1e-9)


@pytest.mark.parametrize("bits", [2, 1])
def test_ldnq_objective_decreases_and_its_codes_lie_in_the_code_set(digits_cnn, digits, bits):
    _, w, h = layer_and_hessian(digits_cnn, digits, "body.4")
    codes = CodeSet.default(bits)
    q, alpha, log = admm_layer(w, h, codes, True, LDNQParams(gptq_candidate=False, refit_scale=False))
    assert codes.contains(q) and (alpha > 0).all()
    assert log["err_best"] < 0.8 * log["err_start"], log  # well below the nearest-rounding start
    assert output_error(w - q * alpha[:, None], h) == pytest.approx(log["err_best"])
    # with GPTQ as a candidate, LDNQ never ends above GPTQ's output error
    qg, ag = GPTQ(w, h).quantize(codes, True, GPTQParams())
    _, _, log2 = admm_layer(w, h, codes, True, LDNQParams())
    assert log2["err_best"] <= output_error(w - qg * ag[:, None], h) * (1 + 1e-9)


def test_bn_reestimation_restores_the_float_statistics(digits_cnn, digits):
    """With float weights, re-estimation wipes corrupted statistics and lands on the population
    statistics of the BatchNorm's inputs (the trained ones are an exponential average of them)."""
    model = copy.deepcopy(digits_cnn)
    x = torch.as_tensor(digits.x_train)
    for bn in batchnorms(model):
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(9.0)
    assert accuracy(model, digits.x_test, digits.y_test) < 50  # corrupted statistics break the model
    assert reestimate_bn(model, x) == 2
    with torch.no_grad():  # the first BatchNorm's inputs: conv1 of the normalised images
        pre = model.body[0](model.normalize(x))
    bn1 = model.body[1]
    std = pre.std((0, 2, 3))  # equal-size batches: the average of batch means is the mean over the samples used
    assert ((bn1.running_mean - pre[:1280].mean((0, 2, 3))).abs() / std).max() < 1e-3
    assert torch.allclose(bn1.running_var, pre.var((0, 2, 3)), rtol=0.05)
    for bn, trained in zip(batchnorms(model), batchnorms(digits_cnn)):
        std = trained.running_var.sqrt()
        assert ((bn.running_mean - trained.running_mean).abs() / std).mean() < 0.1
        assert bn.momentum == trained.momentum and not bn.training
    assert accuracy(model, digits.x_test, digits.y_test) >= accuracy(digits_cnn, digits.x_test, digits.y_test) - 1.5


def test_bn_reestimation_repairs_nearest_rounding_of_a_cnn(digits_cnn, digits):
    off = methods.quantize("ptq", digits_cnn, digits, QuantSpec(bits=3, per_channel=True, progress=False, bn_reestimate=False))
    on = methods.quantize("ptq", digits_cnn, digits, QuantSpec(bits=3, per_channel=True, progress=False))
    assert on.recalibration["bn_layers"] == 2 and "bn_layers" not in off.recalibration
    for name in on.layers:  # the codes are the same: only the BatchNorm statistics changed
        assert torch.equal(on.layers[name].q, off.layers[name].q)
    assert accuracy(on.model, digits.x_test, digits.y_test) > accuracy(off.model, digits.x_test, digits.y_test) + 3


def test_bias_correction_matches_the_float_layer_mean(digits_mlp, digits):
    res = methods.quantize("ptq", digits_mlp, digits, QuantSpec(bits=2, progress=False))
    model = res.model
    first = dict(model.named_modules())["body.1"]
    float_w = {n: dict(digits_mlp.named_modules())[n].weight.detach() for n in res.layers}
    x = digits.calibration(512)
    mean_in = input_mean(model, first, x)
    float_mean = float_w["body.1"].double() @ mean_in + dict(digits_mlp.named_modules())["body.1"].bias.double()
    before = first.weight.double() @ mean_in + first.bias.double()
    assert (before - float_mean).abs().max() > 1e-3
    done = correct_bias(model, float_w, x)
    assert done == list(res.layers)  # an MLP has no BatchNorm: every layer is corrected
    after = first.weight.double() @ mean_in + first.bias.double()
    assert torch.allclose(after, float_mean, atol=1e-5)


def test_gptq_and_ldnq_beat_ptq_on_a_small_cnn(digits_cnn, digits):
    acc = {}
    for name in ("ptq", "gptq", "ldnq"):
        res = methods.quantize(name, digits_cnn, digits, QuantSpec(bits=2, per_channel=True, progress=False))
        acc[name] = accuracy(res.model, digits.x_test, digits.y_test)
        hist = {r["layer"]: r for r in res.history}
        if name == "gptq":
            assert all(r["out_err"] < r["out_err_nearest"] for r in hist.values())
    assert acc["gptq"] >= acc["ptq"] + 3 and acc["ldnq"] >= acc["ptq"] + 3, acc


def test_cli_gptq_records_its_calibration(tmp_path, digits_cnn, digits):
    import json

    from qexport.artifact import read_header
    from qexport.checkpoint import save_checkpoint

    ck = tmp_path / "cnn.safetensors"
    save_checkpoint(ck, digits_cnn, {"architecture": {"model": "cnn-small", "input_shape": [1, 8, 8], "num_classes": 10},
                                     "preprocessing": {"mean": digits.mean.tolist(), "std": digits.std.tolist()}})
    out = tmp_path / "g.qx.safetensors"
    text = run_cli(["quantize", "--checkpoint", str(ck), "--method", "gptq", "--bits", "3", "--per-channel",
                    "--calib-samples", "300", "--bias-correction", "-q", "-o", str(out)])
    assert "BatchNorm re-estimated (2 layers)" in text and "bias corrected (body.9)" in text and "300 training images" in text
    meta = json.loads(read_header(out)["qexport"])
    assert meta["method"]["name"] == "gptq" and meta["spec"]["calib_samples"] == 300
    assert meta["recalibration"]["bn_layers"] == 2 and meta["recalibration"]["bias_corrected"] == ["body.9"]
    assert {r["layer"] for r in meta["history"]} == {"body.0", "body.4", "body.9"}


@pytest.mark.parametrize("args, message", [
    (["--calib-samples", "0"], "--calib-samples"),
    (["--device", "cuda:7"], "device 'cuda:7' is not available"),
    (["--method", "ldnq", "--param", "warm_start=best"], "warm_start"),
    (["--method", "lq", "--param", "budget_epochs=-1"], "budget_epochs >= 0"),
    (["--method", "gptq", "--param", "damp=-1"], "damp >= 0"),
])
def test_cli_refuses_bad_calibration_requests(tmp_path, args, message):
    if "--device" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    args = args if "--method" in args else ["--method", "gptq", *args]
    # refused before any work: with --data pointing nowhere, a later check would fail on the data instead
    text = run_cli(["quantize", "--data", str(tmp_path / "absent.npz"), "-q", "-o", str(tmp_path / "x.qx.safetensors"), *args], code=2)
    assert message in text
    assert not (tmp_path / "x.qx.safetensors").exists()
