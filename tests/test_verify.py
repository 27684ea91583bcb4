"""`qexport verify` must fail a graph with one flipped code, a wrong scale or a missing
normalisation; and the CLI round trip quantize -> to-onnx -> verify -> run works."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import qexport

from qexport.cpu import cpu_flags
from tests_helpers import run_cli

N_TEST = 200


@pytest.fixture(scope="module")
def art4(tmp_path_factory, digits, digits_mlp):
    from test_onnx_export import make_artifact

    return make_artifact(tmp_path_factory.mktemp("v"), digits_mlp, digits, 4, per_channel=True)


def _edit(model: onnx.ModelProto, name: str, fn) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), name))
            return m
    raise KeyError(name)


def flip_one_code(a):
    flat = a.reshape(-1)
    i = int(np.flatnonzero(flat.astype(np.int64) != 0)[0])
    flat[i] = (-flat[i].astype(np.int64)).astype(a.dtype)
    return a


def drop_normalisation(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with Sub(mean)/Div(std) bypassed: raw features go straight in (where the
    normalisation is folded into the input's QuantizeLinear: raw features quantized as if normalised)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    div = next((n for n in m.graph.node if n.op_type == "Div"), None)
    if div is None:
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
        q.input[1:] = [q.input[1].replace(".input_scale", ".scale"), q.input[2].replace(".input_zero_point", ".zero_point")]
        return m
    keep = [n for n in m.graph.node if n.op_type not in ("Sub", "Div")]
    for n in keep:
        n.input[:] = ["input" if i == div.output[0] else i for i in n.input]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


@pytest.mark.parametrize("form", ["weights", "qdq", "qoperator"])
def test_good_graph_passes_and_corrupted_ones_fail(art4, digits, tmp_path, form):
    from qexport.onnx.calibrate import CalibConfig
    from qexport.onnx.export import export_onnx
    from qexport.onnx.verify import verify

    good = export_onnx(art4, form, digits.x_train, CalibConfig(num_batches=4))
    x, y = digits.x_test[:N_TEST], digits.y_test[:N_TEST]
    assert verify("good", art4, x, y, model=good)["passed"]
    scale = "body.3.alpha" if form == "weights" else "body.3.w_scale"
    corrupted = {
        "flipped code": _edit(good, "body.3.codes", flip_one_code),
        "wrong scale": _edit(good, scale, lambda a: (a * np.float32(1.25)).astype(np.float32)),
        "missing normalisation": drop_normalisation(good),
    }
    for what, m in corrupted.items():
        rep = verify(what, art4, x, y, model=m)
        assert not rep["passed"], what
        if what != "missing normalisation":  # the file's integers/scales are compared exactly
            assert rep["initializers_differing"] == [scale if what == "wrong scale" else "body.3.codes"], what
        if what != "flipped code" or form == "weights":  # one code may move no integer output by a step
            assert not rep["runs"]["optimizations_all"]["passed"], what


def test_flipped_code_is_located_in_its_layer(art4, digits):
    """The per-layer comparison names the layer holding the corrupted code."""
    from qexport.onnx.export import export_onnx
    from qexport.onnx.verify import verify

    good = export_onnx(art4, "weights")
    rep = verify("x", art4, digits.x_test[:N_TEST], None, model=_edit(good, "body.3.codes", flip_one_code))
    assert rep["runs"]["optimizations_off"]["first_divergence"]["layer"] == "body.3"


def test_cli_round_trip(tmp_path, digits_mlp, digits, art4):
    """quantize -> to-onnx (every form) -> verify (exit 0, JSON) -> run (--data and --input)."""
    a = tmp_path / "d2.qx.safetensors"
    run_cli(["quantize", "--method", "ptq", "--bits", "2", "--epochs", "3", "-q", "-o", str(a)])
    for form in ("weights", "qdq", "qoperator"):
        o = tmp_path / f"d2.{form}.onnx"
        out = run_cli(["to-onnx", str(a), "--form", form, "-o", str(o), "-q", "--calib-batches", "2"])
        assert "wrote" in out and o.is_file()
        rep = tmp_path / f"{form}.json"
        out = run_cli(["verify", str(o), "--artifact", str(a), "--report", str(rep)])
        assert "PASSED" in out and json.loads(rep.read_text())["passed"]
    out = run_cli(["run", str(tmp_path / "d2.qdq.onnx"), "--data", "digits", "--repeats", "3"])
    assert "accuracy" in out and "median" in out
    np.save(tmp_path / "x.npy", digits.x_test[:5])
    run_cli(["run", str(tmp_path / "d2.weights.onnx"), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "p.npy")])
    assert np.load(tmp_path / "p.npy").shape == (5, 10)


def test_cli_verify_exits_1_on_a_corrupted_graph(tmp_path, art4):
    from qexport.onnx.export import export_onnx

    bad = _edit(export_onnx(art4, "weights"), "body.1.alpha", lambda a: (a * np.float32(1.01)).astype(np.float32))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    out = run_cli(["verify", str(tmp_path / "bad.onnx"), "--artifact", str(art4_path(art4, tmp_path))], code=1)
    assert "FAILED" in out


def art4_path(art, tmp_path):
    from qexport.artifact import save_artifact

    p = tmp_path / "a.qx.safetensors"
    save_artifact(p, art.model, art.layers, {k: v for k, v in art.meta.items() if k != "layers"})
    return p


def test_cli_refuses_wide_codes_for_integer_forms(tmp_path):
    a = tmp_path / "t8.qx.safetensors"
    run_cli(["quantize", "--method", "ptq", "--bits", "8", "--scheme", "thesis", "--epochs", "2", "-q", "-o", str(a)])
    out = run_cli(["to-onnx", str(a), "--form", "qoperator", "-o", str(tmp_path / "t.onnx")], code=2)
    assert "do not fit int8" in out and "--form weights" in out


def test_run_works_on_a_foreign_onnx_classifier(tmp_path, digits):
    """A graph qexport did not write, with a fixed batch of 1 and a flat 64-wide input."""
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "foreign",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "f.onnx"))
    out = run_cli(["run", str(tmp_path / "f.onnx"), "--data", "digits", "--repeats", "3"])
    acc = float(out.split("accuracy ")[1].split("%")[0])
    expected = ((digits.x_test.reshape(-1, 64) @ w).argmax(1) == digits.y_test).mean() * 100
    assert abs(acc - expected) < 0.006  # printed with 2 decimals
    assert "batch 1" in out


def test_int_types_used_by_weights_form(art4):
    from qexport.onnx.export import export_onnx

    t = {i.name: numpy_helper.to_array(i) for i in export_onnx(art4, "weights").graph.initializer}
    assert t["body.1.codes"].dtype == ml_dtypes.int4


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(),
                    reason="onnxruntime's AVX2 QLinearAdd kernel runs only on an AVX2 CPU")
def test_qlinearadd_reference_equals_onnxruntime_on_every_input_pair():
    """verify compares residual adds with our emulation of MLAS's QLinearAdd: it must give
    onnxruntime's byte for every (a, b) pair; a plain fp32 sum differed in ~1 value in 10^6, which
    made a binary ResNet-20 fail verify by 2 output steps."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from qexport.ops.integer import QParams, qadd

    a, b = (x.ravel() for x in np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8)))
    rng = np.random.default_rng(0)
    for _ in range(40):
        s = rng.uniform(0.002, 0.3, 3).astype(np.float32)
        z = rng.integers(0, 256, 3).astype(np.uint8)
        names = ["sa", "za", "sb", "zb", "sc", "zc"]
        inits = [numpy_helper.from_array(np.array(v), n) for n, v in zip(names, [s[0], z[0], s[1], z[1], s[2], z[2]])]
        node = helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"], domain="com.microsoft")
        io = [helper.make_tensor_value_info(n, TensorProto.UINT8, [a.size]) for n in "abc"]
        graph = helper.make_graph([node], "qadd", io[:2], io[2:], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a, "b": b})[0]
        p = [QParams(s[i], z[i]) for i in range(3)]
        ours = qadd(torch.from_numpy(a.astype(np.int64)), p[0], torch.from_numpy(b.astype(np.int64)), p[1], p[2])
        assert np.array_equal(ours.numpy().astype(np.uint8), got), (s, z)


def test_quantize_reference_maps_nan_and_infinities_as_onnxruntime():
    """A float island can compute 0/0 (efficientvit's linear attention divides by a sum that
    quantizes to 0): onnxruntime's QuantizeLinear makes NaN code 0 and saturates ±inf; the
    reference must give the same bytes, or verify fails a correct file by 2^63 steps."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from qexport.ops.integer import QParams, to_uint8

    x = np.array([np.nan, np.inf, -np.inf, 1.0, -1.0, 0.0, 1e30, -1e30] * 5, np.float32)
    for zp in (0, 37, 128, 255):
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(zp, np.uint8), "z")]
        graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], "q",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
                                  [helper.make_tensor_value_info("y", TensorProto.UINT8, [x.size])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        ours = to_uint8(torch.from_numpy(x), QParams(np.float32(0.1), np.uint8(zp)))
        assert np.array_equal(ours.numpy(), got.astype(np.int64)), (zp, ours.numpy()[:8], got[:8])


class Ratio(nn.Module):
    """A mix of h over the sum of h, (W h) / (Σh + 1e-6), as efficientvit's linear attention divides
    by a sum: quantized, the sum loses the 1e-6 in its step, and where every h is 0 the integer
    graph computed 0/0, which QuantizeLinear turns into the lowest code, not 0."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.mix = nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.fc(x.flatten(1)))
        return self.head(self.mix(h) / (h.sum(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("form", ["qdq", "qoperator"])
def test_consecutive_float_islands_pass_float_values(digits, tmp_path, form):
    from qexport.graph import fuse
    from qexport.onnx.integer_graph import float_values
    from qexport.ops.emit import qname

    torch.manual_seed(0)
    model = Ratio().eval()
    with torch.no_grad():
        model.fc.bias.sub_(10.0)  # every h is 0 on two thirds of the test samples
    art = qexport.quantize(model, digits, "ptq", 8, per_channel=True)
    path = tmp_path / f"ratio-{form}.onnx"
    qexport.to_onnx(art, path, form, digits)
    floats = float_values(fuse(art.graph), art.layers)
    assert len(floats) == 2  # the sum and the sum + 1e-6: read only by float ops
    quantized = {o for n in onnx.load(path).graph.node if n.op_type == "QuantizeLinear" for o in n.output}
    assert not {qname(v) for v in floats} & quantized
    report = qexport.verify(path, art, digits)
    assert report["passed"], report["runs"]
    import onnxruntime as ort

    x = np.asarray(digits.x_test, np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    assert np.isfinite(got).all()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95  # with the sum quantized: 0.34


class Gate(nn.Module):
    """A squeeze-and-excitation gate, h * sigmoid(W h), as EfficientNet, MobileNetV3 and RegNetY have."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.gate = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.fc(x.flatten(1)))
        return self.head(h * torch.sigmoid(self.gate(h)))


def test_a_gate_stays_quantized_so_onnxruntime_fuses_its_product(digits, tmp_path):
    """The sigmoid is a float island read only by a float island (the product), yet its value stays
    uint8: onnxruntime fuses DequantizeLinear -> Mul -> QuantizeLinear into QLinearMul only when both
    inputs are quantized (float gates left the SE blocks of EfficientNet and MobileNetV3 in float)."""
    import onnxruntime as ort

    from qexport.graph import fuse
    from qexport.onnx.integer_graph import float_values

    torch.manual_seed(0)
    art = qexport.quantize(Gate().eval(), digits, "ptq", 8, per_channel=True)
    assert not float_values(fuse(art.graph), art.layers)
    path = tmp_path / "gate.onnx"
    qexport.to_onnx(art, path, "qdq", digits)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "gate.optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert "QLinearMul" in {n.op_type for n in onnx.load(tmp_path / "gate.optimized.onnx").graph.node}
    report = qexport.verify(path, art, digits)
    assert report["passed"], report["runs"]


def silu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 10)).eval()


def test_silu_runs_as_quantized_sigmoid_and_product_and_older_files_still_verify(digits, tmp_path, monkeypatch):
    """SiLU is written as a quantized sigmoid times its input, which onnxruntime runs as QLinearSigmoid
    and QLinearMul (one float island cost a third of efficientnet_b0's time); a file written before
    that, with SiLU one float island, is verified as written."""
    import onnxruntime as ort

    import qexport.graph as graph
    import qexport.onnx.export as export

    art = qexport.quantize(silu_net(), digits, "ptq", 8, per_channel=True)
    path = tmp_path / "silu.onnx"
    qexport.to_onnx(art, path, "qdq", digits)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "silu.optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(tmp_path / "silu.optimized.onnx").graph.node}
    assert {"QLinearSigmoid", "QLinearMul"} <= fused and "Sigmoid" not in fused, fused
    unsplit = graph.fuse
    with monkeypatch.context() as m:  # the exporter before the split
        m.setattr(graph, "fuse", lambda g: unsplit(g, split_silu=False))
        m.setattr(export, "fuse", lambda g: unsplit(g, split_silu=False))
        qexport.to_onnx(art, tmp_path / "old.onnx", "qdq", digits)
    old = {n.op_type for n in onnx.load(tmp_path / "old.onnx").graph.node}
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(tmp_path / "old.onnx").graph.node) \
        == sum(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node) - 1 and "Sigmoid" in old
    for p in (path, tmp_path / "old.onnx"):
        report = qexport.verify(p, art, digits)
        assert report["passed"], (p, report["runs"])


def test_a_file_that_quantizes_every_value_is_judged_as_written(digits, tmp_path, monkeypatch):
    """A file written before float islands passed float values on (every value quantized) still
    passes `verify`: the reference follows which values the file quantizes."""
    import qexport.onnx.integer_graph as integer_graph

    torch.manual_seed(0)
    model = Ratio().eval()
    art = qexport.quantize(model, digits, "ptq", 8, per_channel=True)
    with monkeypatch.context() as m:
        m.setattr(integer_graph, "float_values", lambda ops, layers: set())
        qexport.to_onnx(art, tmp_path / "old.onnx", "qdq", digits)
    qexport.to_onnx(art, tmp_path / "new.onnx", "qdq", digits)
    quantizes = [sum(n.op_type == "QuantizeLinear" for n in onnx.load(tmp_path / f).graph.node) for f in ("old.onnx", "new.onnx")]
    assert quantizes[0] == quantizes[1] + 2  # the sum and the sum + 1e-6
    report = qexport.verify(tmp_path / "old.onnx", art, digits)
    assert report["passed"], report["runs"]


# ---------------------------------------------------------------------------------------------
# Each (form, session mode) against the reference that describes what onnxruntime runs.

@pytest.fixture(scope="module")
def resnet_qdq(tmp_path_factory, digits):
    """A random ResNet-20 (BatchNorm, residual adds) at 8 bits per channel and its qdq file."""
    from test_onnx_export import make_artifact, random_resnet

    from qexport.onnx.calibrate import CalibConfig
    from qexport.onnx.export import export_onnx

    art = make_artifact(tmp_path_factory.mktemp("r"), random_resnet(digits), digits, 8, per_channel=True, name="resnet20")
    return art, export_onnx(art, "qdq", digits.x_train, CalibConfig(num_batches=4))


def _tie_carried_on(art, model, x, layer: int, bump: int):
    """What onnxruntime would hold if layer `layer` had landed `bump` steps off on one value and
    every later layer had computed exactly on what it received: the reference pipeline, run op by
    op from the bumped value on (the way an unfused qdq graph carries a rounding tie)."""
    import torch

    from qexport.graph import fuse
    from qexport.ops.emit import qname
    from qexport.onnx.verify import integer_op, read_qparams
    from qexport.ops import KINDS
    from qexport.ops.base import INPUT, Ctx
    from qexport.ops.integer import to_uint8

    ops = fuse(art.graph)
    qp = read_qparams(model, ops)
    ctx = Ctx(None, art.layers, qp, None, art.graph.shapes)
    xt = torch.as_tensor(x)
    vals = {INPUT: to_uint8(xt, qp[INPUT]).to(torch.int64)} if INPUT in qp else {}
    for k, op in enumerate(ops):
        y = integer_op(ctx, op, [] if KINDS[op.kind].float_input else [vals[i] for i in op.inputs], xt, qp)
        if k == layer:
            y = y.clone()
            flat = y.view(-1)
            i = int(torch.nonzero(flat < 255 - bump)[0])
            flat[i] += bump
        vals[op.out] = y
    got = {qname(v): t.numpy().astype(np.uint8) for v, t in vals.items()}
    return ops, qp, xt, got


@pytest.mark.parametrize("bump,passes", [(1, True), (2, False)])
def test_unfused_qdq_is_judged_layer_by_layer(resnet_qdq, digits, bump, passes):
    """A one-step tie in one layer, carried on by the later layers, is within tolerance at that
    layer and nowhere else; two steps are not. (The output may then differ by more than a step:
    with optimisations off onnxruntime runs every layer in fp32, where ties land differently.)"""
    from qexport.onnx.verify import layerwise_steps

    art, model = resnet_qdq
    from qexport.graph import fuse

    convs = [k for k, op in enumerate(fuse(art.graph)) if op.kind == "conv"]
    ops, qp, xt, got = _tie_carried_on(art, model, digits.x_test[:32].astype(np.float32), convs[3], bump)
    steps = {r["layer"]: r["max_steps"] for r in layerwise_steps(art, ops, qp, xt, got)}
    bumped = ops[convs[3]].name
    assert steps[bumped] == bump
    assert all(v == 0 for k, v in steps.items() if k != bumped), steps
    assert (max(steps.values()) <= 1) == passes


def test_unfused_qdq_input_stage_is_the_references(resnet_qdq, digits):
    """The raw input is quantized by the reference, not taken from onnxruntime: a graph that
    quantizes it wrongly (e.g. without the normalisation) is caught at the first stage."""
    from qexport.ops.emit import qname
    from qexport.onnx.verify import layerwise_steps
    from qexport.ops.base import INPUT

    art, model = resnet_qdq
    ops, qp, xt, got = _tie_carried_on(art, model, digits.x_test[:32].astype(np.float32), 0, 0)
    first = qname(INPUT) if qname(INPUT) in got else qname(ops[0].out)  # the normalisation folded into it
    got[first] = np.clip(got[first].astype(np.int64) + 3, 0, 255).astype(np.uint8)
    rec = layerwise_steps(art, ops, qp, xt, got)[0]
    assert rec["tensor"] == first and rec["max_steps"] == 3


def test_each_run_says_what_it_was_judged_against(resnet_qdq, digits):
    from qexport.onnx.export import export_onnx
    from qexport.onnx.verify import verify

    art, model = resnet_qdq
    x, y = digits.x_test[:N_TEST], digits.y_test[:N_TEST]
    rep = verify("q", art, x, y, model=model)
    assert rep["passed"]
    off, on = rep["runs"]["optimizations_off"], rep["runs"]["optimizations_all"]
    assert off["reference"].startswith("per layer") and off["max_steps_layerwise"] <= 1
    assert on["reference"] == "the integer reference, end to end" and on["max_steps"] <= 1
    rep = verify("w", art, x, y, model=export_onnx(art, "weights"))
    assert rep["passed"]
    for r in rep["runs"].values():
        assert r["reference"].startswith("the graph in float64")
        # the allowance is PyTorch's own fp32 error on this model (8x), and never below --rel-tol
        assert r["rel_allowed"] == max(1e-5, 8 * r["rel_error_pytorch_fp32"]) and r["rel_error"] <= r["rel_allowed"]


def test_a_file_written_again_at_the_same_path_is_read_again(art4, digits, tmp_path):
    """verify reads the file as it is now: a corrupted file written over a good one at the same path
    (a notebook re-exporting) fails, and the good one written back passes."""
    import qexport
    from qexport.onnx.calibrate import CalibConfig
    from qexport.onnx.export import export_onnx

    path = tmp_path / "m.onnx"
    good = export_onnx(art4, "weights", digits.x_train, CalibConfig(num_batches=4))
    for model, passes in ((good, True), (_edit(good, "body.3.codes", flip_one_code), False), (good, True)):
        onnx.save(model, str(path))
        assert qexport.verify(path, art4, digits, max_samples=N_TEST)["passed"] is passes
