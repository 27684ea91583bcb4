"""ONNX export: every form at 1, 2, 4, 8 bits for an MLP and ResNet-20 — codes and scales in the
file equal the artifact's exactly, onnxruntime agrees with the reference, sizes follow the bits,
and unsupported input is refused with a message naming the problem."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from qadmm.errors import UserError

BITS = (1, 2, 4, 8)
FORMS = ("weights", "qdq", "qoperator")
N_TEST = 200  # test samples per verification: keeps the suite fast


def make_artifact(tmp_path, model: nn.Module, data, bits: int, per_channel: bool, scheme: str | None = None, name="mlp-digits"):
    """PTQ through the Python API, saved and loaded back as a user would get it."""
    from qadmm.methods import ptq
    from qadmm.spec import QuantSpec
    from qexport.artifact import load_artifact, save_artifact
    from qexport.workflow import preprocessing

    res = ptq.quantize(model, data, QuantSpec(bits=bits, scheme=scheme, per_channel=per_channel, progress=False))
    meta = {"architecture": {"model": name, "input_shape": list(data.input_shape), "num_classes": data.num_classes},
            "preprocessing": preprocessing(data), "dataset": data.describe(), "method": {"name": "ptq", "params": res.params},
            "spec": {"bits": bits, "scheme": res.layers[next(iter(res.layers))].codes.scheme, "per_channel": per_channel, "seed": 0}}
    path = tmp_path / f"{name}-{bits}b{'-pc' if per_channel else ''}{scheme or ''}.qx.safetensors"
    save_artifact(path, res.model, res.layers, meta)
    return load_artifact(path)


def random_resnet(data) -> nn.Module:
    """ResNet-20 with random weights and random BatchNorm statistics (negative γ included, so
    the sign flips of the BN fold are exercised)."""
    from qadmm.zoo import build_model

    torch.manual_seed(0)
    m = build_model("resnet20", data.input_shape, data.num_classes, data.mean, data.std)
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            mod.weight.data.copy_((torch.rand(c, generator=g) * 2 - 1) * 1.5)
            mod.bias.data.copy_((torch.rand(c, generator=g) - 0.5) * 0.6)
    return m.eval()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, digits, digits_mlp):
    """{(model, bits): Artifact}: trained mlp-digits and random ResNet-20 on 8x8 digits, PTQ'd;
    even bit widths per channel, odd per tensor."""
    tmp = tmp_path_factory.mktemp("artifacts")
    resnet = random_resnet(digits)
    out = {}
    for bits in BITS:
        out[("mlp", bits)] = make_artifact(tmp, digits_mlp, digits, bits, per_channel=bits % 2 == 0)
        out[("resnet20", bits)] = make_artifact(tmp, resnet, digits, bits, per_channel=bits % 2 == 0, name="resnet20")
    return out


@pytest.fixture(scope="session")
def exported(artifacts, digits, tmp_path_factory):
    """{(model, bits, form): path of the exported ONNX file}."""
    from qexport.onnx.calibrate import CalibConfig
    from qexport.onnx.export import export_onnx

    tmp = tmp_path_factory.mktemp("onnx")
    out = {}
    for (model, bits), art in artifacts.items():
        for form in FORMS:
            m = export_onnx(art, form, digits.x_train, CalibConfig(num_batches=4))
            path = tmp / f"{model}-{bits}.{form}.onnx"
            onnx.save(m, str(path))
            out[(model, bits, form)] = path
    return out


def inits(path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def bn_factor(art, layer: str) -> np.ndarray | None:
    """γ/σ of the BatchNorm right after `layer` in the zoo ResNet (None when there is none)."""
    mods = dict(art.model.named_modules())
    parent, _, leaf = layer.rpartition(".")
    bn_name = {"conv1": "bn1", "conv2": "bn2"}.get(leaf)
    if bn_name:
        bn = mods[f"{parent}.{bn_name}"]
    elif leaf == "0" and parent.endswith("shortcut"):
        bn = mods[f"{parent}.1"]
    elif layer == "body.0" and isinstance(mods.get("body.1"), nn.BatchNorm2d):
        bn = mods["body.1"]
    else:
        return None
    return bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.double().numpy() + bn.eps)


@pytest.mark.parametrize("model", ["mlp", "resnet20"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("form", FORMS)
def test_codes_and_scales_in_file_are_the_artifacts(artifacts, exported, model, bits, form):
    art = artifacts[(model, bits)]
    t = inits(exported[(model, bits, form)])
    for name, lc in art.layers.items():
        q = lc.q.numpy().astype(np.int64)
        codes = t[f"{name}.codes"]
        if form == "weights":
            expected_type = {1: ml_dtypes.int2, 2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}[bits]
            assert codes.dtype == expected_type, (name, codes.dtype)
            np.testing.assert_array_equal(codes.astype(np.int64), q)
            assert t[f"{name}.alpha"].dtype == np.float32
            # bit-for-bit α, stored (C, 1, ...) so Mul broadcasts it over the output channels
            np.testing.assert_array_equal(t[f"{name}.alpha"].reshape(lc.alpha.shape), lc.alpha.numpy())
            continue
        assert codes.dtype == np.int8
        assert not t[f"{name}.w_zero_point"].any()
        f = bn_factor(art, name)
        if f is None:
            np.testing.assert_array_equal(codes.astype(np.int64), q)
            np.testing.assert_array_equal(t[f"{name}.w_scale"], lc.alpha.numpy())
        else:  # folded BN: codes are the artifact's with each channel's sign flipped where α·γ/σ < 0
            sign = np.where(np.broadcast_to(lc.alpha.double().numpy(), f.shape) * f < 0, -1, 1)
            np.testing.assert_array_equal(codes.astype(np.int64), q * sign.reshape(-1, 1, 1, 1))
            expected = np.abs(np.broadcast_to(lc.alpha.double().numpy(), f.shape) * f).astype(np.float32)
            widened = t[f"{name}.w_scale"] != expected  # only channels with γ ≈ 0 may be widened (bias fit)
            assert widened.sum() <= 1 and np.all(np.abs(f[widened]) < 1e-3), name
        assert t[f"{name}.bias_int32"].dtype == np.int32


def test_bn_fold_flips_signs_somewhere(artifacts, exported):
    """The random ResNet has negative γ: the fold must have flipped some channel's codes."""
    art = artifacts[("resnet20", 4)]
    codes = inits(exported[("resnet20", 4, "qoperator")])["body.0.codes"].astype(np.int64)
    q = art.layers["body.0"].q.numpy().astype(np.int64)
    assert (codes == -q).all(axis=(1, 2, 3)).any() and (codes == q).all(axis=(1, 2, 3)).any()


@pytest.mark.parametrize("model", ["mlp", "resnet20"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("form", FORMS)
def test_verify_passes(artifacts, exported, digits, model, bits, form):
    from qexport.onnx.verify import verify

    rep = verify(str(exported[(model, bits, form)]), artifacts[(model, bits)], digits.x_test[:N_TEST], digits.y_test[:N_TEST])
    assert rep["passed"], json.dumps(rep["runs"], indent=1)
    judged = [r for k, r in rep["runs"].items() if k != "ort_defaults" and r.get("judged", True)]
    assert any(r["level"] == "all" for r in judged)
    if form == "qoperator" and bits < 8 and model == "mlp":  # QGemm without saturation risk: bit-exact
        assert all(r["max_steps"] == 0 for r in judged)
    if model == "mlp":  # trained: quantized accuracy stays near the float model's ~96%
        assert rep["accuracy"]["reference"] > (60 if bits == 1 else 85)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_weights_file_size_follows_bits(artifacts, exported, bits):
    """Codes are packed at the type's width (INT2 holds 1-bit codes too: ONNX has no 1-bit type);
    the rest of the file is the float BN/bias/α values and a fixed graph overhead."""
    art = artifacts[("resnet20", bits)]
    m = onnx.load(str(exported[("resnet20", bits, "weights")]))
    type_bits = {1: 2, 2: 2, 4: 4, 8: 8}[bits]
    raw = {t.name: len(t.raw_data) for t in m.graph.initializer}
    for name, lc in art.layers.items():
        assert raw[f"{name}.codes"] == -(-lc.q.numel() * type_bits // 8), name
    fp32_weights = sum(4 * lc.q.numel() for lc in art.layers.values())
    floats = sum(n for k, n in raw.items() if not k.endswith(".codes"))
    size = exported[("resnet20", bits, "weights")].stat().st_size
    assert size <= 1.1 * type_bits / 32 * fp32_weights + floats + 24_000, (size, fp32_weights, floats)


def test_graph_contract(exported, artifacts):
    """Every form: checker passes, dynamic batch, metadata, runs at batch 1 and 7 with all optimisations."""
    from qexport.onnx.runner import make_session

    for (model, bits, form), path in exported.items():
        if bits != 4:
            continue
        m = onnx.load(str(path))
        onnx.checker.check_model(m, full_check=True)
        assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        meta = {p.key: p.value for p in m.metadata_props}
        art = artifacts[(model, bits)]
        assert meta["qexport.form"] == form and meta["qexport.bits"] == "4" and meta["qexport.scheme"] == "symmetric"
        assert meta["qexport.artifact_sha256"] == art.sha256 and meta["qexport.method"] == "ptq"
        assert meta["qexport.version"]
        types = {n.op_type for n in m.graph.node}
        if form == "weights":
            assert {"Sub", "Div"} <= types  # normalisation is inside the graph
        else:  # one mean/std for all pixels: folded into the input's QuantizeLinear (test_deployment)
            first = next(n for n in m.graph.node if "input" in n.input)
            assert first.op_type == "QuantizeLinear" and first.input[1].endswith(".input_scale") and not {"Sub", "Div"} & types
        if form == "qoperator":
            assert "QuantizeLinear" in types and ("QLinearConv" in types or "QGemm" in types)
        sess = make_session(str(path), "all")
        for n in (1, 7):
            assert sess.run(None, {"input": np.zeros((n, 1, 8, 8), np.float32)})[0].shape == (n, 10)


def test_qdq_runs_fused_integer_kernels(exported, tmp_path):
    """A profiling run: the qdq ResNet-20 executes QLinearConv/QGemm/QLinearAdd, not float Conv."""
    from qexport.onnx.runner import make_session

    sess = make_session(str(exported[("resnet20", 4, "qdq")]), "all", threads=1, profile_prefix=str(tmp_path / "prof"))
    sess.run(None, {"input": np.zeros((2, 1, 8, 8), np.float32)})
    events = json.loads(open(sess.end_profiling()).read())
    ops = {e["args"].get("op_name") for e in events if e.get("cat") == "Node"}
    assert {"QLinearConv", "QLinearAdd", "QGemm"} <= ops, ops
    assert not ops & {"Conv", "Gemm", "FusedConv"}, ops


def test_thesis_8bit_is_int16_in_weights_and_refused_by_integer_forms(tmp_path, digits, digits_mlp):
    from qexport.onnx.export import export_onnx

    art = make_artifact(tmp_path, digits_mlp, digits, 8, per_channel=False, scheme="thesis")
    m = export_onnx(art, "weights")
    t = {i.name: i for i in m.graph.initializer}
    assert t["body.1.codes"].data_type == onnx.TensorProto.INT16
    for form in ("qdq", "qoperator"):
        with pytest.raises(UserError, match=r"body\.1 .*do not fit int8.*--form weights"):
            export_onnx(art, form, digits.x_train)


class Sort(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=1).values


@pytest.mark.parametrize("body, needle", [
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 8), Sort(), nn.Linear(8, 10)),
     r"aten\.sort\.default is not one qexport runs at test_onnx_export\.py:\d+ \(torch\.fx: unsupported op sort"),
])
def test_unsupported_layer_is_named(digits, body, needle):
    """An op neither capture takes is refused by name, with its line in the user's code."""
    from collections import OrderedDict

    from qadmm.zoo import Normalize
    from qexport.graph import trace

    model = nn.Sequential(OrderedDict(normalize=Normalize(digits.mean, digits.std), body=body))
    with pytest.raises(UserError, match=needle):
        trace(model, digits.input_shape)


def test_users_own_module_with_residual_and_pooling_exports(digits):
    """A user's block (conv, BN, ReLU, residual add, max/avg pooling, flatten) traces to ops."""
    from collections import OrderedDict

    from qadmm.zoo import Normalize
    from qexport.graph import evaluate, fuse, trace

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
            self.pool, self.avg = nn.MaxPool2d(2), nn.AvgPool2d(2)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.flatten(self.avg(self.pool(torch.relu(self.c2(y) + y))), 1)

    model = nn.Sequential(OrderedDict(normalize=Normalize(digits.mean, digits.std), body=nn.Sequential(Block(), nn.Linear(16, 10)))).eval()
    ops = fuse(trace(model, digits.input_shape))
    assert [o.kind for o in ops] == ["normalize", "conv", "conv", "add", "maxpool", "avgpool", "flatten", "linear"]
    assert ops[1].bn is not None and ops[1].relu and ops[3].relu
    x = torch.as_tensor(digits.x_test[:5])
    torch.testing.assert_close(evaluate(ops, x)["logits"], model(x), rtol=0, atol=0)
