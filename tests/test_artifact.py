"""The artifact round-trips exactly, rebuilds the fake-quant reference, and refuses bad files."""
import json

import pytest
import torch
from safetensors.torch import save_file

from qadmm import methods
from qadmm.errors import UserError
from qadmm.spec import QuantSpec
from qadmm.train import accuracy
from qexport.artifact import load_artifact, save_artifact

META = lambda d: {"architecture": {"model": "mlp-digits", "input_shape": list(d.input_shape), "num_classes": d.num_classes},  # noqa: E731
                  "preprocessing": {"mean": d.mean.tolist(), "std": d.std.tolist()}}


@pytest.mark.parametrize("bits,scheme,per_channel", [(1, None, False), (2, None, True), (4, None, False),
                                                     (8, "thesis", True), (3, "thesis", False)])
def test_roundtrip_is_exact(tmp_path, digits, digits_mlp, bits, scheme, per_channel):
    res = methods.quantize("ptq", digits_mlp, digits, QuantSpec(bits=bits, scheme=scheme, per_channel=per_channel, progress=False))
    path = tmp_path / "a.qx.safetensors"
    digest = save_artifact(path, res.model, res.layers, META(digits))
    art = load_artifact(path)
    assert art.sha256 == digest
    for name, lc in res.layers.items():
        assert torch.equal(art.layers[name].q, lc.q) and art.layers[name].q.dtype == lc.codes.storage_dtype
        assert torch.equal(art.layers[name].alpha, lc.alpha)
        # the rebuilt model computes with W = α·Q exactly
        w = dict(art.model.named_modules())[name].weight
        assert torch.equal(w, lc.q.float() * (lc.alpha.reshape(-1, 1) if per_channel else lc.alpha))
    x = torch.as_tensor(digits.x_test)
    assert torch.equal(art.model(x), res.model.eval()(x))
    assert accuracy(art.model, digits.x_test, digits.y_test) == accuracy(res.model, digits.x_test, digits.y_test)


def test_ptq_keeps_float_layers_and_biases(digits, digits_mlp):
    res = methods.quantize("ptq", digits_mlp, digits, QuantSpec(bits=4, keep_first=True, keep_last=True, progress=False))
    assert list(res.layers) == ["body.3"]
    assert torch.equal(res.model.body[1].weight, digits_mlp.body[1].weight)
    assert torch.equal(res.model.body[3].bias, digits_mlp.body[3].bias)
    assert not torch.equal(res.model.body[3].weight, digits_mlp.body[3].weight)


def test_ptq_accuracy_on_digits(digits, digits_mlp):
    fa = accuracy(digits_mlp, digits.x_test, digits.y_test)
    assert fa > 93
    for bits, drop in [(8, 0.6), (4, 3.0)]:
        res = methods.quantize("ptq", digits_mlp, digits, QuantSpec(bits=bits, progress=False))
        assert accuracy(res.model, digits.x_test, digits.y_test) >= fa - drop


def _saved(tmp_path, digits, digits_mlp):
    res = methods.quantize("ptq", digits_mlp, digits, QuantSpec(bits=2, progress=False))
    path = tmp_path / "a.qx.safetensors"
    save_artifact(path, res.model, res.layers, META(digits))
    return path


def test_truncated_file(tmp_path, digits, digits_mlp):
    path = _saved(tmp_path, digits, digits_mlp)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        load_artifact(path)


def test_corrupted_file(tmp_path, digits, digits_mlp):
    path = _saved(tmp_path, digits, digits_mlp)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # flip one bit in the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="hash mismatch"):
        load_artifact(path)


def test_foreign_and_newer_files(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(UserError, match="not a qexport artifact"):
        load_artifact(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "new.safetensors"), metadata={"format": "qexport-artifact", "version": "99", "qexport": json.dumps({})})
    with pytest.raises(UserError, match="newer than this qexport"):
        load_artifact(tmp_path / "new.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_artifact(tmp_path / "text.safetensors")


def test_missing_output_folder_writes_nothing(tmp_path, digits, digits_mlp):
    res = methods.quantize("ptq", digits_mlp, digits, QuantSpec(bits=2, progress=False))
    with pytest.raises(UserError, match="does not exist"):
        save_artifact(tmp_path / "nope" / "a.qx.safetensors", res.model, res.layers, META(digits))
    assert list(tmp_path.iterdir()) == []
