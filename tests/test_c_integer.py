"""`qexport to-c`, integer C: every op kind it takes, at 1, 2, 4 and 8 bits, compiles warning-free
and computes exactly what the integer reference and onnxruntime (QOperator) compute, on the digits
test images; the same sources in QEMU's Cortex-M4 give the host's outputs bit for bit."""
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import qexport
from qadmm.errors import UserError
from qexport.pack import c_integer
from tests_helpers import run_cli

needs_cc = pytest.mark.skipif(c_integer.compiler() is None,
                              reason="no C compiler (cc, gcc or clang) on PATH: install one (apt-get install gcc) to run the C tests")


class AllKinds(nn.Module):
    """conv (padded; depthwise with stride 2; grouped with dilation), BatchNorm, ReLU and ReLU6 folded,
    max pool with padding, a residual add with a ReLU after it, global average pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 1))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(self.dw(self.stem(x)))
        x = torch.relu(x + self.branch(x))
        return self.head(torch.flatten(self.gap(x), 1))


class Tokens(nn.Module):
    """Conv1d over the rows of the image and a Linear applied to every position (rank-3 input)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.mix = nn.Linear(16, 12)
        self.head = nn.Linear(12 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x.reshape(x.shape[0], 8, 8)))
        x = torch.relu(self.mix(x.transpose(1, 2).reshape(x.shape[0], 8, 16)))
        return self.head(x.reshape(x.shape[0], -1))


def quantized(model: nn.Module, digits, bits: int, per_channel: bool):
    torch.manual_seed(0)
    model = model.eval()
    with torch.no_grad():  # BatchNorm statistics of the images, as a trained network's would be
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.train()
        model(torch.as_tensor(digits.x_train[:256]))
        model.eval()
    return qexport.quantize(model, digits, "ptq", bits, per_channel=per_channel, progress=False)


@needs_cc
@pytest.mark.parametrize("bits,per_channel", [(1, True), (2, False), (4, True), (8, True)])
def test_c_equals_reference_and_onnxruntime(tmp_path, digits, bits, per_channel):
    art = quantized(AllKinds(), digits, bits, per_channel)
    cm = qexport.api.to_c(art, tmp_path / "c", digits)
    rep = c_integer.verify_folder(tmp_path / "c", art, digits.x_test, digits.y_test)
    assert rep["samples"] == len(digits.x_test)
    assert rep["against"]["integer reference"]["differing_outputs"] == 0
    assert rep["against"]["onnxruntime qoperator"]["differing_outputs"] == 0
    assert rep["passed"]
    # the weights stay packed: the codes' bytes are the packed file's payloads, N bits per weight
    n = sum(lc.q.numel() for lc in art.layers.values())
    assert cm.flash["codes"] <= sum(-(-lc.q.numel() * bits // 8) for lc in art.layers.values()) < n * bits / 8 + len(art.layers)


@needs_cc
def test_c_conv1d_and_linear_on_tokens(tmp_path, digits):
    art = quantized(Tokens(), digits, 4, True)
    with pytest.raises(UserError, match="no integer C kernel .*aten_move"):  # the transpose reorders bytes
        qexport.api.to_c(art, tmp_path / "c", digits)


@needs_cc
def test_arena_reuses_memory(tmp_path, digits):
    """Liveness: a chain needs far less than the sum of its values (the residual's input stays alive)."""
    art = quantized(AllKinds(), digits, 4, True)
    cm = qexport.api.to_c(art, None, digits)
    total = sum(int(np.prod(s)) for v, s in art.graph.shapes.items())
    assert cm.manifest["arena_bytes"] < total / 2
    # at least the two largest values alive at once (the stem's output and the depthwise output)
    assert cm.manifest["arena_bytes"] >= 8 * 8 * 8 + 8 * 4 * 4


@needs_cc
def test_cli_to_c_and_verify_an_mlp(tmp_path, digits):
    torch.manual_seed(0)
    from qadmm.zoo import build_model

    model = build_model("mlp-digits", digits.input_shape, digits.num_classes, digits.mean, digits.std).eval()
    art = qexport.quantize(model, digits, "ptq", 2, per_channel=True, progress=False)
    art.save(tmp_path / "m.qx.safetensors")
    out = run_cli(["to-c", str(tmp_path / "m.qx.safetensors"), "-o", str(tmp_path / "c")])
    assert "flash:" in out and "RAM:" in out
    out = run_cli(["verify", str(tmp_path / "c"), "--artifact", str(tmp_path / "m.qx.safetensors")])
    assert "0 differing outputs" in out and out.strip().endswith("PASSED")


def test_cli_refuses_ops_without_c_kernel(tmp_path, digits):
    from user_models import with_sigmoid

    torch.manual_seed(0)
    art = qexport.quantize(with_sigmoid(digits.input_shape, digits.num_classes), digits, "ptq", 4, progress=False)
    art.save(tmp_path / "s.qx.safetensors")
    msg = run_cli(["to-c", str(tmp_path / "s.qx.safetensors"), "-o", str(tmp_path / "c")], code=2)
    assert msg.startswith("error: to-c has no integer C kernel") and "sigmoid" in msg and "qexport to-onnx" in msg


def test_c_refusal_names_a_silu_as_the_model_has_it(tmp_path, digits):
    # the ONNX export writes SiLU as a sigmoid and a product; the refusal names the model's own op
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.SiLU(), torch.nn.Linear(16, 10))
    art = qexport.quantize(model.eval(), digits, "ptq", 4, progress=False)
    art.save(tmp_path / "s.qx.safetensors")
    msg = run_cli(["to-c", str(tmp_path / "s.qx.safetensors"), "-o", str(tmp_path / "c")], code=2)
    assert "2 (silu)" in msg and "mul" not in msg, msg
    assert len(msg.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_verify_refuses_a_folder_of_another_artifact(tmp_path, digits):
    art = quantized(AllKinds(), digits, 4, True)
    qexport.api.to_c(art, tmp_path / "c", digits)
    other = quantized(AllKinds(), digits, 2, True)
    with pytest.raises(UserError, match="written from artifact .* not from this one"):
        c_integer.verify_folder(tmp_path / "c", other, digits.x_test[:4], None)


@needs_cc
@pytest.mark.skipif(c_integer.cortex_m4_tools() is not None, reason=str(c_integer.cortex_m4_tools()))
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_cortex_m4_in_qemu_equals_host(tmp_path, digits, bits):
    art = quantized(AllKinds(), digits, bits, True)
    qexport.api.to_c(art, tmp_path / "c", digits)
    rep = c_integer.verify_folder(tmp_path / "c", art, digits.x_test[:100], digits.y_test[:100], cortex_m4=100)
    assert rep["cortex_m4"]["samples"] == 100 and rep["cortex_m4"]["differing_outputs"] == 0
    assert rep["cortex_m4"]["sizes"]["text"] > 0 and rep["passed"]
    assert shutil.which("arm-none-eabi-gcc")


@needs_cc
def test_verify_fails_a_corrupted_folder(tmp_path, digits):
    """One changed requantization multiplier in qmodel.c: verify must see the outputs differ."""
    import re

    art = quantized(AllKinds(), digits, 4, True)
    qexport.api.to_c(art, tmp_path / "c", digits)
    src = (tmp_path / "c" / "qmodel.c").read_text()
    first = re.search(r"qm_m0\[\d+\] = \{\n    ([-0-9.e+]+)f", src)
    bad = src.replace(first.group(0), first.group(0).replace(first.group(1), f"{float(first.group(1)) * 1.5:.9e}"), 1)
    (tmp_path / "c" / "qmodel.c").write_text(bad)
    rep = c_integer.verify_folder(tmp_path / "c", art, digits.x_test, None)
    assert not rep["passed"] and rep["against"]["integer reference"]["differing_outputs"] > 0


class _Rows(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.reshape(x.shape[0], 8, 8))


class _Add(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


ALONE = {
    "conv": lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)),
    "conv_depthwise_strided": lambda: nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)),
    "conv_same_dilated": lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding="same", dilation=2)),
    "conv1d": lambda: _Rows(nn.Conv1d(8, 4, 3, padding=1)),
    "linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
    "linear_on_rows": lambda: _Rows(nn.Linear(8, 5)),
    "conv_relu6": lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6()),
    "maxpool": lambda: nn.Sequential(nn.Conv2d(1, 4, 1), nn.MaxPool2d(3, stride=2, padding=1)),
    "global_avgpool": lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1)),
    "add": _Add,
}


@needs_cc
@pytest.mark.parametrize("kind", list(ALONE))
def test_each_kind_alone_on_random_inputs(tmp_path, kind):
    """Each op kind as the whole model, unlabelled random inputs (seeded): 0 differing outputs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 1, 8, 8)).astype(np.float32)
    torch.manual_seed(0)
    data = qexport.api.as_dataset(x)
    art = qexport.quantize(ALONE[kind]().eval(), data, "ptq", 4, per_channel=True, progress=False)
    qexport.api.to_c(art, tmp_path / "c", data)
    rep = c_integer.verify_folder(tmp_path / "c", art, data.x_test, None)
    assert rep["passed"] and rep["samples"] > 0, rep["against"]
