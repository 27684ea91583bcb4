"""Per-layer bit widths (QuantSpec.layer_bits), excluded layers (QuantSpec.exclude), and the layer kinds
beyond Linear/Conv2d the calibration math reads as matrix products: Conv1d, grouped convolutions,
'same' padding of even kernels and non-zero padding modes."""
import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qadmm import methods
from qadmm.codes import CodeSet, fit
from qadmm.errors import UserError
from qadmm.layer_inputs import as_rows, gram, input_hessian, weight_matrix
from qadmm.layers import select_layers
from qadmm.layerwise import output_error
from qadmm.methods.gptq import GPTQ, Params as GPTQParams
from qadmm.methods.ldnq import Params as LDNQParams, admm_layer
from qadmm.recalibrate import correct_bias
from qadmm.spec import QuantSpec
from qadmm.train import TrainConfig, accuracy, seed_everything, train_epochs

# Short runs: these tests check which code set each layer gets, not how well a method trains.
FAST = {"gptq": {}, "ldnq": {}, "ptq": {}, "ste": {"epochs": 1}, "admm-q": {"epochs": 1}, "proxquant": {"epochs": 1},
        "md-tanh": {"epochs": 1}, "md-softmax": {"epochs": 1}, "askewsgd": {"epochs": 1},
        "lq": {"iters": 1, "inner_epochs": 0.1, "retrain_epochs": 0, "min_steps": 1}, "qnn-admm": {"iterations": 2}}
MLP_LAYERS = ["body.1", "body.3", "body.5"]  # mlp-digits: Flatten, Linear, ReLU, Linear, ReLU, Linear


def spec(**kw) -> QuantSpec:
    return QuantSpec(progress=False, calib_samples=256, **kw)


def check_result(res, codes: dict[str, CodeSet]) -> None:
    """Each layer has exactly the expected code set, codes inside it, and the model computes α·Q."""
    modules = dict(res.model.named_modules())
    assert {n: lc.codes for n, lc in res.layers.items()} == codes
    for name, lc in res.layers.items():
        assert lc.codes.contains(lc.q) and (lc.alpha > 0).all()
        assert torch.equal(modules[name].weight, lc.weight()), name


# -- the spec --

def test_codes_for_first_matching_pattern_and_scheme_where_valid():
    s = QuantSpec(bits=4, layer_bits={"body.1": 8, "body.*": 2, "fc": 1})
    assert s.codes_for("body.1") == CodeSet(8, "symmetric")  # first match wins, in dict order
    assert s.codes_for("body.3") == CodeSet(2, "symmetric")
    assert s.codes_for("fc") == CodeSet(1, "binary")
    assert s.codes_for("head") == s.codes == CodeSet(4, "symmetric")
    # the spec's scheme where it allows the width, else the default one
    assert QuantSpec(bits=3, scheme="thesis", layer_bits={"a": 1}).codes_for("a") == CodeSet(1, "thesis")
    assert QuantSpec(bits=1, scheme="binary", layer_bits={"a": 4}).codes_for("a") == CodeSet(4, "symmetric")
    assert QuantSpec(bits=4, scheme="symmetric", layer_bits={"a": 1}).codes_for("a") == CodeSet(1, "binary")
    assert QuantSpec(exclude="body.1").exclude == ("body.1",)  # one pattern, not one per character


@pytest.mark.parametrize("bits", [0, 9, 2.5, "4", True])
def test_bad_layer_bit_width_is_refused_before_any_work(bits, digits, digits_mlp):
    with pytest.raises(UserError, match=r"layer_bits body\.1=.*integer from 1 to 8"):
        methods.check("ptq", spec(layer_bits={"body.1": bits}))
    with pytest.raises(UserError, match="integer from 1 to 8"):
        methods.quantize("gptq", digits_mlp, digits, spec(layer_bits={"body.1": bits}))


@pytest.mark.parametrize("kw, what", [({"layer_bits": {"body.7": 8}}, "layer_bits pattern 'body.7'"),
                                      ({"exclude": ("features.*",)}, "exclude pattern 'features.*'"),
                                      ({"exclude": ("body.0",)}, "exclude pattern 'body.0'")])  # a Flatten, not quantizable
@pytest.mark.parametrize("method", ["ptq", "gptq", "lq", "ste", "qnn-admm"])
def test_pattern_matching_no_layer_is_refused_naming_it_and_the_layers(kw, what, method, digits, digits_mlp):
    with pytest.raises(UserError) as e:
        methods.quantize(method, digits_mlp, digits, spec(params=FAST[method], **kw))
    msg = str(e.value)
    assert what in msg and "matches no quantizable layer" in msg and "body.1, body.3, body.5" in msg and "\n" not in msg


def test_select_layers_applies_keep_and_exclude_in_forward_order(digits_mlp):
    names = lambda **kw: [n for n, _ in select_layers(digits_mlp, QuantSpec(**kw))]  # noqa: E731
    assert names() == MLP_LAYERS
    assert names(keep_first=True, keep_last=True) == ["body.3"]
    assert names(exclude=("body.3",)) == ["body.1", "body.5"]
    assert names(exclude=("body.[13]",), keep_last=True) == []
    assert names(keep_first=True, exclude=("body.1",)) == ["body.3", "body.5"]  # a pattern may name a kept layer


def test_select_layers_lists_only_the_first_layer_names():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    with pytest.raises(UserError, match=r"its layers: 0, 1, 2, 3, 4, 5, 6, 7, \.\.\. \(12 in all\)"):
        select_layers(model, QuantSpec(exclude=("fc",)))


# -- per-layer widths and exclusion through the methods --

@pytest.mark.parametrize("method", list(methods.METHODS))
def test_layer_bits_give_each_layer_its_own_code_set(method, digits, digits_mlp):
    s = spec(bits=4, layer_bits={"body.1": 8, "body.3": 2}, params=FAST[method])
    res = methods.quantize(method, digits_mlp, digits, s)
    check_result(res, {"body.1": CodeSet(8), "body.3": CodeSet(2), "body.5": CodeSet(4)})
    if method in ("ptq", "gptq"):  # the codes really use each width
        assert 7 < int(res.layers["body.1"].q.abs().max()) <= 127
        assert int(res.layers["body.3"].q.abs().max()) == 1
        assert int(res.layers["body.5"].q.abs().max()) == 7


@pytest.mark.parametrize("method", ["ptq", "gptq", "ldnq", "qnn-admm"])
def test_excluded_layer_stays_float(method, digits, digits_mlp):
    res = methods.quantize(method, digits_mlp, digits, spec(bits=2, exclude=("body.3",), params=FAST[method]))
    assert set(res.layers) == {"body.1", "body.5"}
    check_result(res, {"body.1": CodeSet(2), "body.5": CodeSet(2)})
    if method != "qnn-admm":  # qnn-admm may train a float layer too; the others leave it as it was
        assert torch.equal(dict(res.model.named_modules())["body.3"].weight, digits_mlp.body[3].weight)
    assert accuracy(res.model, digits.x_test, digits.y_test) > 60


def test_eight_bit_hidden_layers_beat_uniform_one_bit(digits, digits_mlp):
    uniform = methods.quantize("ptq", digits_mlp, digits, spec(bits=1))
    mixed = methods.quantize("ptq", digits_mlp, digits, spec(bits=1, layer_bits={"body.1": 8, "body.3": 8}))
    assert accuracy(mixed.model, digits.x_test, digits.y_test) > accuracy(uniform.model, digits.x_test, digits.y_test) + 5


# -- the matrix view of Conv1d, grouped convs and padding modes --

CONVS = [
    nn.Conv1d(4, 6, 3, stride=2, padding=1),
    nn.Conv1d(4, 6, 4, padding="same"),  # even kernel: PyTorch pads one more on the right
    nn.Conv1d(4, 6, 3, dilation=2, padding=2, padding_mode="reflect"),
    nn.Conv1d(4, 8, 3, groups=4, padding=1, padding_mode="circular"),
    nn.Conv2d(4, 6, 3, padding=1, groups=2),
    nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="replicate"),  # depthwise
    nn.Conv2d(4, 6, (2, 3), padding="same", dilation=(1, 2)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: repr(c).replace(" ", ""))
def test_unfolded_rows_reproduce_every_conv_and_the_hessian_has_one_block_per_group(conv):
    torch.manual_seed(0)
    x = torch.randn(3, 4, *([9] if isinstance(conv, nn.Conv1d) else [7, 7]))
    y = conv(x) - conv.bias.reshape(-1, *[1] * (x.dim() - 2))
    rows, w, g = as_rows(conv, x), weight_matrix(conv), conv.groups
    assert w.shape == (conv.out_channels, conv.weight[0].numel())
    y_rows = torch.einsum("ngd,god->ngo", rows.reshape(len(rows), g, -1), w.reshape(g, -1, w.shape[1])).reshape(len(rows), -1)
    assert torch.allclose(y_rows, y.flatten(2).transpose(1, 2).reshape(len(rows), -1), atol=1e-5)
    h = input_hessian(nn.Sequential(conv), conv, x).float()
    full = rows.T @ rows / len(rows)
    d = rows.shape[1] // g
    blocks = torch.stack([full[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(g)])
    assert torch.allclose(h, blocks if g > 1 else blocks[0], atol=1e-5)


def test_rows_of_a_strided_or_channels_last_or_unbatched_input_are_the_unfolded_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2)
    x = torch.randn(2, 3, 9, 8)
    want = F.unfold(F.pad(x, [1, 1, 1, 1]), 3, dilation=2, stride=2).transpose(1, 2).reshape(-1, 27)
    assert torch.equal(as_rows(conv, x), want)  # the same values, in the layout weight_matrix multiplies
    assert torch.equal(as_rows(conv, x.to(memory_format=torch.channels_last)), want)
    assert torch.equal(as_rows(conv, x[:1, :, :, :]), want[:len(want) // 2])
    assert torch.equal(as_rows(conv, x[0]), want[:len(want) // 2])  # unbatched (C, H, W)


def test_gram_of_wide_rows_is_the_symmetric_product():
    torch.manual_seed(0)
    for d in (100, 700):  # below and above the blocked product's threshold
        rows = torch.randn(300, d)
        g = gram(rows)
        assert torch.equal(g, g.T) and torch.allclose(g, rows.T @ rows, rtol=1e-5, atol=1e-3)


def test_grouped_gptq_equals_gptq_on_each_group_per_channel():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=3)
    x = torch.randn(64, 6, 6, 6)
    w, h = weight_matrix(conv).double(), input_hessian(nn.Sequential(conv), conv, x)
    codes = CodeSet(2)
    q, alpha = GPTQ(w, h).quantize(codes, True, GPTQParams())
    for i in range(3):
        qi, ai = GPTQ(w[2 * i:2 * i + 2], h[i]).quantize(codes, True, GPTQParams())
        assert torch.equal(q[2 * i:2 * i + 2], qi) and torch.allclose(alpha[2 * i:2 * i + 2], ai)
    # per tensor: one α for all groups, and the output error stays below nearest rounding
    for per_channel in (False, True):
        q, alpha = GPTQ(w, h).quantize(codes, per_channel, GPTQParams())
        assert alpha.shape == ((6,) if per_channel else (1,))
        deq = q * (alpha[:, None] if per_channel else alpha)
        err = output_error(w - deq, h)
        assert err < output_error(w - fit(w, codes, per_channel).dequantize(), h)
        ql, al, log = admm_layer(w, h, codes, per_channel, LDNQParams())
        assert codes.contains(ql) and log["err_best"] <= err * (1 + 1e-9)  # GPTQ is a candidate


# -- whole models with Conv1d and grouped convs --

def signals(digits):
    """Digits as 1-D signals (1, 64): each image's rows one after another."""
    r = lambda a: a.reshape(len(a), 1, 64)  # noqa: E731
    return dataclasses.replace(digits, x_train=r(digits.x_train), x_val=r(digits.x_val), x_test=r(digits.x_test))


def conv1d_model(groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(1, 16, 5, padding=2, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Conv1d(16, 32, 3, stride=2, padding=1, groups=groups), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(8), nn.Flatten(), nn.Linear(256, 10))


@pytest.fixture(scope="module")
def conv1d_net(digits):
    torch.set_num_threads(1)
    seed_everything(0)
    data = signals(digits)
    model = conv1d_model()
    train_epochs(model, data, TrainConfig(epochs=8, lr=3e-3, batch_size=32, patience=8), progress=False)
    return model.eval(), data


@pytest.mark.parametrize("method", ["ptq", "gptq", "ldnq"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_conv1d_model_quantizes_and_computes_alpha_q(method, per_channel, conv1d_net):
    model, data = conv1d_net
    before = copy.deepcopy(model.state_dict())
    res = methods.quantize(method, model, data, spec(bits=4, per_channel=per_channel, layer_bits={"7": 8}))
    check_result(res, {"0": CodeSet(4), "3": CodeSet(4), "7": CodeSet(8)})
    assert res.recalibration["bn_layers"] == 1  # the BatchNorm1d after the first Conv1d
    if method != "ptq":
        assert res.recalibration["bias_corrected"] == ["3", "7"]  # "0" has no bias and a BatchNorm after it
        assert all(r["out_err"] <= r["out_err_nearest"] * (1 + 1e-6) for r in res.history)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    float_acc = accuracy(model, data.x_test, data.y_test)
    assert float_acc > 85 and accuracy(res.model, data.x_test, data.y_test) > float_acc - 8


@pytest.mark.parametrize("method", ["ptq", "gptq", "ldnq", "lq"])
def test_grouped_conv_model_quantizes_with_every_method(method, digits):
    data = signals(digits)
    seed_everything(0)
    model = conv1d_model(groups=4).eval()
    res = methods.quantize(method, model, data, spec(bits=3, params=FAST[method]))
    check_result(res, {"0": CodeSet(3), "3": CodeSet(3), "7": CodeSet(3)})
    assert res.layers["3"].alpha.dim() == 0  # per tensor: one scale across the groups
    if method in ("gptq", "ldnq"):
        hist = {r["layer"]: r for r in res.history}
        assert hist["3"]["out_err"] < hist["3"]["out_err_nearest"]


def test_bias_correction_of_a_grouped_conv_restores_its_float_output_mean():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2))
    x = torch.randn(200, 4, 6, 6) + 0.5  # non-zero input mean: the weight error shifts the output mean
    float_w = {"0": net[0].weight.detach().clone()}
    float_mean = net(x).mean((0, 2, 3)).detach()
    with torch.no_grad():
        net[0].weight.copy_(fit(net[0].weight, CodeSet(1, "binary")).dequantize())
    assert (net(x).mean((0, 2, 3)) - float_mean).abs().max() > 1e-2
    assert correct_bias(net, float_w, x) == ["0"]
    assert torch.allclose(net(x).mean((0, 2, 3)), float_mean, atol=1e-4)
