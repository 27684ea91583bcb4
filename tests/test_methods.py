"""The contract every registered back-end keeps, and the gradient-based baselines' accuracy."""
import copy

import pytest
import torch

from qadmm import methods
from qadmm.spec import QuantSpec
from qadmm.train import accuracy

# Short runs: the contract does not depend on the length of training.
FAST = {"ste": {"epochs": 3}, "admm-q": {"epochs": 3}, "proxquant": {"epochs": 3}, "lq": {}, "qnn-admm": {},
        "md-tanh": {"epochs": 3}, "md-softmax": {"epochs": 3}, "askewsgd": {"epochs": 3}}


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_method_contract(name, digits, digits_mlp):
    before = copy.deepcopy(digits_mlp.state_dict())
    spec = QuantSpec(bits=2, params=FAST.get(name, {}), progress=False, keep_last=name != "qnn-admm")
    res = methods.quantize(name, digits_mlp, digits, spec)
    assert res.method == name and set(FAST.get(name, {})) <= set(res.params)
    modules = dict(res.model.named_modules())
    assert res.layers, "no layer was quantized"
    for layer, lc in res.layers.items():
        assert lc.codes.contains(lc.q) and lc.q.dtype == torch.int8
        assert torch.equal(modules[layer].weight, lc.weight())  # the model computes with exactly α·Q
        assert (lc.alpha > 0).all()
    # the caller's float model is untouched
    for k, v in digits_mlp.state_dict().items():
        assert torch.equal(v, before[k])
    assert accuracy(res.model, digits.x_test, digits.y_test) > 60


@pytest.mark.parametrize("name,params", [("ste", {}), ("admm-q", {}), ("proxquant", {}), ("md-tanh", {}), ("md-softmax", {}),
                                         ("askewsgd", {}), ("admm-q", {"soft": 0.5}), ("admm-q", {"random": 0.3})])
def test_quantized_training_beats_ptq_at_one_bit(name, params, digits, digits_mlp):
    ptq = methods.quantize("ptq", digits_mlp, digits, QuantSpec(bits=1, progress=False))
    res = methods.quantize(name, digits_mlp, digits, QuantSpec(bits=1, params=params, progress=False))  # default schedule
    a_ptq, a = accuracy(ptq.model, digits.x_test, digits.y_test), accuracy(res.model, digits.x_test, digits.y_test)
    assert a >= a_ptq + 2, (a_ptq, a)


def test_same_seed_same_codes(digits, digits_mlp):
    runs = [methods.quantize("ste", digits_mlp, digits, QuantSpec(bits=2, params={"epochs": 2}, progress=False)) for _ in range(2)]
    for layer in runs[0].layers:
        assert torch.equal(runs[0].layers[layer].q, runs[1].layers[layer].q)


def test_help_and_readme_say_what_the_registry_says():
    """The defaults `quantize --help` states and the README's methods table are the registry's flags."""
    import re
    from pathlib import Path

    from click.testing import CliRunner

    from qexport.cli.main import main

    text = " ".join(CliRunner().invoke(main, ["quantize", "--help"], terminal_width=200).output.split())
    no_bn = sorted(n for n, m in methods.METHODS.items() if not m.recalibrate)
    assert no_bn == ["lq", "qnn-admm"] and "on for every method but lq and qnn-admm" in text
    bias = sorted(n for n, m in methods.METHODS.items() if m.bias_correction)
    assert bias == ["gptq", "ldnq"] and "(default: on for gptq, ldnq; off otherwise)" in text
    listed = re.search(r"--method TEXT Back-end: (.*?) \(see --list-methods\)", text).group(1)
    assert sorted(listed.split(", ")) == sorted(methods.METHODS)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = re.search(r"\| method \| what it does \|.*?\n\n", readme, flags=re.S).group(0)
    assert {m for m in re.findall(r"^\| `([a-z-]+)`", table, flags=re.M)} == set(methods.METHODS)
    for name, m in methods.METHODS.items():
        assert m.name == name and m.summary and m.defaults()
