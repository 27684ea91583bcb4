"""The torch.export capture (`qexport/capture.py`): what torch.fx refuses is captured exactly,
stored as data, and a forged graph is refused on load."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import qexport
from qadmm.errors import BadFile
from qexport.artifact import content_hash, load_artifact
from qexport.fileio import read_safetensors
from qexport.graph import GraphModel, fx_trace, trace
from qadmm.errors import UserError


class Shuffle(nn.Module):
    """Channel shuffle (shape arithmetic), a layer scale used directly in forward, a constant
    computed from a buffer (folded), chunk and permute: nothing torch.fx can trace into kinds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gamma = nn.Parameter(torch.full((8, 1, 1), 0.5))
        self.register_buffer("table", torch.linspace(-1, 1, 8))
        self.fc = nn.Linear(8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle
        a, z = y.chunk(2, dim=1)
        y = torch.cat([a, z * self.gamma[4:]], dim=1) + self.table.tanh().view(1, c, 1, 1)
        y = y.permute(0, 2, 3, 1).mean(-1)  # (b, h, w)
        return self.fc(y.flatten(1))


@pytest.fixture(scope="module")
def digits01(digits):
    from qadmm.data import from_arrays

    return from_arrays("digits01", np.concatenate([digits.x_train, digits.x_val]) / 16.0,
                       np.concatenate([digits.y_train, digits.y_val]), digits.x_test / 16.0, digits.y_test)


@pytest.fixture(scope="module")
def captured(tmp_path_factory, digits01):
    torch.manual_seed(0)
    model = Shuffle().eval()
    art = qexport.quantize(model, digits01, "ptq", 8, per_channel=True)
    path = tmp_path_factory.mktemp("capture") / "m.qx.safetensors"
    art.save(path)
    return model, art, path


def test_fx_refuses_and_the_capture_takes_it_exactly(captured, digits01):
    model, art, path = captured
    with pytest.raises(UserError, match="a tensor's shape used other than as x.size"):
        fx_trace(model, (1, 8, 8))
    kinds = {op.kind for op in art.graph.ops}
    assert {"conv", "batchnorm", "relu", "linear", "aten", "aten_move"} <= kinds, kinds
    assert set(art.layers) == {"conv", "fc"}  # the user's names: quantized as any Linear/Conv
    graph = trace(model, (1, 8, 8))
    assert any(n.startswith("folded.") for n in graph.constants)  # tanh(table), computed once
    assert any(k.startswith("float/folded.") for k in read_safetensors(path)[1])  # and stored
    g = GraphModel(graph).eval()
    want = g.state_dict()  # gamma[4:] and tanh(table) are folded: the graph reads neither parameter itself
    g.load_state_dict({k: v for k, v in {**graph.constants, **model.state_dict()}.items() if k in want})
    x = torch.as_tensor(digits01.x_test[:50])
    with torch.no_grad():
        assert torch.equal(g(x), model(x))
        loaded = load_artifact(path)
        assert torch.equal(loaded.model(x), art.model(x))  # the file alone, no user code
    assert read_safetensors(path)[0]["version"] == "3"


def test_fx_models_keep_format_2(tmp_path, digits, digits_mlp):
    art = qexport.quantize(digits_mlp, digits, "ptq", 4)
    art.save(tmp_path / "a.qx.safetensors")
    assert read_safetensors(tmp_path / "a.qx.safetensors")[0]["version"] == "2"


def _aten_op(meta: dict, kind: str = "aten") -> dict:
    return next(o for o in meta["graph"]["ops"] if o["kind"] == kind)


FORGERIES = {
    "an operator outside the allow-list": (lambda m: _aten_op(m).update(attrs={**_aten_op(m)["attrs"], "target": "aten.fill_.Scalar"}),
                                           "operator 'aten.fill_.Scalar' is not one qexport runs"),
    "a Python name as operator": (lambda m: _aten_op(m)["attrs"].update(target="builtins.eval"),
                                  "operator 'builtins.eval' is not one qexport runs"),
    "an argument of unknown form": (lambda m: _aten_op(m)["attrs"]["args"].append({"eval": "1"}), "argument"),
    "a constant of an unknown dtype": (lambda m: [o["attrs"]["consts"][0].__setitem__(2, "object") for o in m["graph"]["ops"]
                                                  if o["attrs"].get("consts")][:1], "constant"),
    "a constant of another shape": (lambda m: [o["attrs"]["consts"][0].__setitem__(1, [3, 3]) for o in m["graph"]["ops"]
                                               if o["attrs"].get("consts")][:1], "wrong shape"),
    "an input index out of range": (lambda m: _aten_op(m, "aten_move")["attrs"]["args"].__setitem__(0, {"in": 7}),
                                    "does not build or run"),
}


@pytest.mark.parametrize("case", list(FORGERIES))
def test_forged_captured_graph_is_refused(captured, tmp_path, case):
    _, _, path = captured
    fn, message = FORGERIES[case]
    header, tensors = read_safetensors(path)
    meta = json.loads(header["qexport"])
    fn(meta)
    meta_json = json.dumps(meta, sort_keys=True)
    bad = tmp_path / "bad.qx.safetensors"
    save_file(tensors, str(bad), metadata={**header, "qexport": meta_json, "content_sha256": content_hash(tensors, meta_json)})
    with pytest.raises(BadFile, match=message):
        load_artifact(bad)


def test_streamed_walk_gives_the_same_codes(captured, digits01):
    """gptq on the rebuilt graph runs the calibration inputs through once for the whole walk;
    the codes are those of running the layers before each one again (the walk without it)."""
    from qadmm import methods
    from qadmm.spec import QuantSpec
    from qexport.graph import rebuilt

    model, _, _ = captured
    graph = trace(model, (1, 8, 8))
    spec = QuantSpec(bits=3, per_channel=True, calib_samples=300, seed=0)
    streamed = methods.quantize("gptq", rebuilt(graph, model), digits01, spec)
    plain = rebuilt(graph, model)
    plain.streamed = None  # the walk then runs the model up to each layer, as for any nn.Module
    again = methods.quantize("gptq", plain, digits01, spec)
    assert set(streamed.layers) == set(again.layers) == {"conv", "fc"}
    for name in streamed.layers:
        assert torch.equal(streamed.layers[name].q, again.layers[name].q)
        assert torch.equal(streamed.layers[name].alpha, again.layers[name].alpha)


class BNStack(nn.Module):
    """Three conv-BatchNorm pairs (one grouped), a residual add and a head: BatchNorms between every
    pair of quantized layers, so each walk step re-estimates some."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = y + self.b3(self.c3(torch.relu(self.b2(self.c2(y)))))
        return self.fc(torch.relu(y).flatten(1))


@pytest.mark.parametrize("method", ["gptq", "ldnq"])
def test_streamed_batchnorm_reestimation_is_the_plain_one(digits01, method):
    """With BatchNorm re-estimated after each layer, the streamed walk keeps the train-mode values
    where the last re-estimation stopped instead of running from the input again: the same codes,
    scales and BatchNorm statistics as the walk on the plain model."""
    from qadmm import methods
    from qadmm.recalibrate import reestimate_bn
    from qadmm.spec import QuantSpec
    from qexport.graph import rebuilt

    torch.manual_seed(0)
    model = BNStack()
    reestimate_bn(model, torch.as_tensor(digits01.x_train[:512], dtype=torch.float32).reshape(-1, 1, 8, 8))
    graph = trace(model, (1, 8, 8))
    spec = QuantSpec(bits=2, per_channel=True, calib_samples=400, seed=0, bn_reestimate=False,
                     params={"bn_samples": 300} if method == "gptq" else {})
    streamed = methods.quantize(method, rebuilt(graph, model), digits01, spec)
    plain = rebuilt(graph, model)
    plain.streamed = None
    again = methods.quantize(method, plain, digits01, spec)
    for name in ("c1", "c2", "c3", "fc"):
        assert torch.equal(streamed.layers[name].q, again.layers[name].q), name
        assert torch.equal(streamed.layers[name].alpha, again.layers[name].alpha), name
    ours, theirs = streamed.model.state_dict(), again.model.state_dict()
    assert any("running_mean" in k for k in ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
