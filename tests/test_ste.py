"""The STE baseline: quantized fine-tuning recovers what plain PTQ loses at 1 bit on digits."""
import torch

from qadmm import methods
from qadmm.spec import QuantSpec
from qadmm.train import accuracy


def test_ste_beats_ptq_at_one_bit(digits, digits_mlp):
    ptq = methods.quantize("ptq", digits_mlp, digits, QuantSpec(bits=1, progress=False))
    ste = methods.quantize("ste", digits_mlp, digits, QuantSpec(bits=1, params={"epochs": 6}, progress=False))
    a_ptq = accuracy(ptq.model, digits.x_test, digits.y_test)
    a_ste = accuracy(ste.model, digits.x_test, digits.y_test)
    assert a_ste >= a_ptq + 3, (a_ptq, a_ste)
    for name, lc in ste.layers.items():  # the returned model computes with exactly α·Q
        assert lc.codes.contains(lc.q)
        assert torch.equal(dict(ste.model.named_modules())[name].weight, lc.weight())
    assert not any(p is q for p, q in zip(ste.model.parameters(), digits_mlp.parameters()))
