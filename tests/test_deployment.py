"""Deployment settings: what onnxruntime does to the files under the settings a user will run them
with. The `weights` form must leave no dequantization to do at run time under onnxruntime's
*default* options (fp32 speed) and stay exact; 7-bit codes make integer graphs exact without the
slow x64 setting on CPUs without VNNI; `run --profile` says where the time goes."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests_helpers import run_cli


def optimized(model: onnx.ModelProto, tmp_path, config: dict[str, str] | None = None) -> onnx.ModelProto:
    """The graph as onnxruntime runs it after ORT_ENABLE_ALL with `config` (default: none)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def reads_codes(model: onnx.ModelProto) -> list[str]:
    """Nodes that still read a `.codes` initializer (dequantization work left for every run)."""
    return [f"{n.op_type}:{n.name}" for n in model.graph.node if any(i.endswith(".codes") for i in n.input)]


@pytest.fixture(scope="module")
def cnn_artifacts(tmp_path_factory, digits, digits_cnn):
    """Trained cnn-small on digits, PTQ per channel at 2, 4, 8 bits and 7 bits (±63)."""
    from qexport import api

    d = tmp_path_factory.mktemp("deploy")
    out = {}
    for bits in (2, 4, 7, 8):
        path = d / f"cnn-{bits}b.qx.safetensors"
        api.quantize(digits_cnn, digits, "ptq", bits, per_channel=True).save(path)
        out[bits] = api.load(path)
        out[bits].path = path  # for the CLI tests
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weights_form_is_folded_under_default_settings_and_exact(cnn_artifacts, digits, digits_cnn, tmp_path, bits):
    from qexport import api
    from qexport.onnx.runner import faithful_config
    from qexport.onnx.verify import verify

    art = cnn_artifacts[bits]
    path = tmp_path / "w.onnx"
    model = api.to_onnx(art, path, "weights")
    assert faithful_config(model) == {}  # nothing for the user to set
    ran = optimized(model, tmp_path)
    assert not reads_codes(ran), "onnxruntime left dequantization for run time"
    # what runs is the fp32 model's graph, node for node (BatchNorm folded into Conv, fused ReLU)
    fp32 = api.to_onnx(api.quantize(digits_cnn, digits, "ptq", bits, exclude=["*"]), None, "weights")
    assert Counter(n.op_type for n in ran.graph.node) == Counter(n.op_type for n in optimized(fp32, tmp_path).graph.node)
    # the file keeps N bits per weight: codes stored as INT2/INT4/INT8, no float copy of the weights
    types = {t.name: t.data_type for t in model.graph.initializer if t.name.endswith(".codes")}
    want = {2: onnx.TensorProto.INT2, 4: onnx.TensorProto.INT4, 8: onnx.TensorProto.INT8}[bits]
    assert types and set(types.values()) == {want}
    assert not any(t.name.endswith(".weight") for t in model.graph.initializer if t.name.split(".")[0] in art.layers)
    rep = verify(str(path), art, digits.x_test[:200], digits.y_test[:200])
    runs = rep["runs"]
    assert set(runs) == {"optimizations_off", "optimizations_all"} and runs["optimizations_all"]["session_config"] == {}
    assert rep["passed"] and runs["optimizations_all"]["rel_error"] <= 1e-5


def test_dequantizelinear_variant_needs_its_setting(cnn_artifacts, digits, tmp_path):
    """Kept for runtimes that want DequantizeLinear: onnxruntime leaves the DQ nodes by default (the
    slow path the issue measured); `qexport run`/`verify` add the setting that folds them."""
    from qexport import api
    from qexport.onnx.runner import faithful_config

    art = cnn_artifacts[4]
    model = api.to_onnx(art, tmp_path / "dq.onnx", "weights", dequant="dequantizelinear")
    assert {n.op_type for n in model.graph.node} >= {"DequantizeLinear"}
    config = faithful_config(model)
    assert config == {"session.disable_quant_qdq": "1"}
    assert reads_codes(optimized(model, tmp_path)), "default settings keep DequantizeLinear"
    assert not reads_codes(optimized(model, tmp_path, config))
    rep = api.verify(tmp_path / "dq.onnx", art, digits, max_samples=200)
    assert rep["passed"] and rep["runs"]["optimizations_all"]["session_config"] == config


def test_dequant_choice_is_refused_for_integer_forms(cnn_artifacts, tmp_path):
    out = run_cli(["to-onnx", str(cnn_artifacts[8].path), "--form", "qoperator", "--dequant", "dequantizelinear",
                   "-o", str(tmp_path / "x.onnx")], code=2)
    assert "--dequant applies to --form weights only" in out
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("form", ["qdq", "qoperator"])
def test_seven_bit_codes_need_no_session_setting(cnn_artifacts, digits, tmp_path, form):
    """onnxruntime's reduce_range: codes within ±63 cannot saturate the u8·s8 int16 pair sums on
    CPUs without VNNI (2·255·64 < 2^15), so no x64quantprecision (half speed) is needed, and the
    file verifies under default settings; 8-bit codes need the setting."""
    from qexport import api
    from qexport.onnx.runner import SATURATION_SAFE_CODE, faithful_config, max_code

    m7 = api.to_onnx(cnn_artifacts[7], tmp_path / "q7.onnx", form, digits)
    assert max_code(m7) <= 63 < SATURATION_SAFE_CODE and faithful_config(m7, vnni=False) == {}
    m8 = api.to_onnx(cnn_artifacts[8], None, form, digits)
    assert max_code(m8) > SATURATION_SAFE_CODE and faithful_config(m8, vnni=False) == {"session.x64quantprecision": "1"}
    assert faithful_config(m8, vnni=True) == faithful_config(m8, vnni=None) == {}  # VNNI and ARM kernels do not saturate
    rep = api.verify(tmp_path / "q7.onnx", cnn_artifacts[7], digits, max_samples=200)
    assert rep["passed"] and rep["runs"]["optimizations_all"]["session_config"] == {}


def test_to_onnx_says_when_codes_need_the_slow_setting(cnn_artifacts, tmp_path):
    out = run_cli(["to-onnx", str(cnn_artifacts[8].path), "--form", "qoperator", "-o", str(tmp_path / "q8.onnx"), "-q"])
    assert "--bits 7" in out and "x64quantprecision" in out
    out = run_cli(["to-onnx", str(cnn_artifacts[7].path), "--form", "qoperator", "-o", str(tmp_path / "q7.onnx"), "-q"])
    assert "--bits 7" not in out


def test_run_profile_names_the_slowest_nodes(cnn_artifacts, digits, tmp_path):
    from qexport import api

    path = tmp_path / "q.onnx"
    api.to_onnx(cnn_artifacts[8], path, "qoperator", digits)
    out = run_cli(["run", str(path), "--data", "digits", "--batch-size", "1", "--repeats", "5", "--profile", "3"])
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("profile:"))
    slowest = lines[head + 1:head + 4]
    assert len(slowest) == 3 and all("µs" in s for s in slowest)
    times = [float(s.split()[0]) for s in slowest]
    assert times == sorted(times, reverse=True)
    assert any("QLinearConv" in s for s in lines[head:])  # the integer kernels are what it runs
    assert "by operator type:" in out
    run_cli(["run", str(path), "--input", str(path), "--profile", "3"], code=2)


@pytest.mark.parametrize("form", ["qdq", "qoperator"])
def test_normalisation_folds_into_the_input_quantization_exactly(digits, digits_mlp, tmp_path, form):
    """One mean and std for every pixel: QuantizeLinear(x, s·std, zp - k) replaces Sub, Div and
    QuantizeLinear, bit for bit what the reference computes; per-feature statistics keep them."""
    from qexport import api

    art = api.quantize(digits_mlp, digits, "ptq", 8, per_channel=True)
    model = api.to_onnx(art, tmp_path / "f.onnx", form, digits)
    types = [n.op_type for n in model.graph.node]
    assert "Sub" not in types and "Div" not in types
    first = next(n for n in model.graph.node if "input" in n.input)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    scale, zp = inits[first.input[1]], int(inits[first.input[2]])
    s, z = inits["normalize.scale"], int(inits["normalize.zero_point"])
    mean, std = float(digits.mean.ravel()[0]), float(digits.std.ravel()[0])
    assert scale == np.float32(s * np.float32(std))  # S = s·std
    k = mean / float(scale)
    assert abs(k - round(k)) < 1e-3 and zp == z - round(k)  # mean/S whole: the shift is exact
    rep = api.verify(tmp_path / "f.onnx", art, digits, max_samples=300)
    assert rep["passed"] and rep["runs"]["optimizations_all"]["max_steps"] == 0  # integer kernels: bit for bit

    # per-pixel statistics (a user's `normalize=(mean, std)` arrays) keep Sub and Div in float
    import torch
    from torch import nn

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    mean = digits.x_train.mean(0).astype(np.float32)
    std = digits.x_train.std(0).astype(np.float32) + 1.0
    art2 = api.quantize(plain, digits, "ptq", 8, normalize=(mean, std))
    m2 = api.to_onnx(art2, tmp_path / "g.onnx", form, digits)
    assert {"Sub", "Div"} <= {n.op_type for n in m2.graph.node}
    assert api.verify(tmp_path / "g.onnx", art2, digits, max_samples=300)["passed"]
