"""Every ONNX file qexport writes is clean: no initializer that no node reads (onnxruntime 1.17
warns about each at load), and every graph output produced by a node. Checked on every form of
the shipped checkpoints and of the digits models the other tests use, plus a model whose values
pass through Flatten and MaxPool (their uint8 values share their input's quantization parameters)."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

FORMS = ("weights", "qdq", "qoperator")
MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED = {name: MODELS / f"{name}.safetensors" for name in ("digits-mlp", "fashion-cnn-small", "fashion-resnet20")}


def graphs(g):
    """The graph and its subgraphs (If/Loop/Scan bodies), depth first."""
    yield g
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from graphs(sub)


def unread_initializers(model) -> list[str]:
    read = {i for g in graphs(model.graph) for n in g.node for i in n.input}
    return [t.name for g in graphs(model.graph) for t in g.initializer if t.name not in read]


def unproduced_outputs(model) -> list[str]:
    made = {o for n in model.graph.node for o in n.output}
    return [o.name for o in model.graph.output if o.name not in made]


def random_images(shape: tuple[int, ...], n: int = 64, seed: int = 0):
    """(x_train, y_train, x_test, y_test) of uniform [0, 1) images: the shipped Fashion-MNIST
    checkpoints quantized and calibrated without the dataset (what is checked is the graph's form)."""
    rng = np.random.default_rng(seed)
    x = rng.random((2 * n, *shape), dtype=np.float32)
    y = rng.integers(0, 10, 2 * n)
    return x[:n], y[:n], x[n:], y[n:]


@pytest.fixture(scope="module")
def exports(digits, digits_mlp):
    """{(model, bits): {form: ModelProto}} for the shipped checkpoints and the digits models."""
    import qexport
    from qexport.checkpoint import load_checkpoint
    from qadmm.zoo import Normalize
    from test_onnx_export import random_resnet

    torch.manual_seed(0)
    pooled = nn.Sequential(OrderedDict(normalize=Normalize(digits.mean, digits.std), body=nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10)))).eval()
    models = {"digits_mlp": (digits_mlp, digits), "resnet20-digits": (random_resnet(digits), digits), "pooled": (pooled, digits)}
    for name, path in SHIPPED.items():
        model, meta = load_checkpoint(path)
        models[name] = (model, digits if name == "digits-mlp" else random_images(tuple(meta["architecture"]["input_shape"])))
    out = {}
    for name, (model, data) in models.items():
        for bits in (2, 8):
            art = qexport.quantize(model, data, "ptq", bits, per_channel=bits == 8, calib_samples=64)
            out[(name, bits)] = {form: qexport.to_onnx(art, None, form, data, calib_batches=1) for form in FORMS}
    return out


def test_every_initializer_is_read_and_every_output_produced(exports):
    for (name, bits), by_form in exports.items():
        for form, model in by_form.items():
            assert not unread_initializers(model), (name, bits, form, unread_initializers(model))
            assert not unproduced_outputs(model), (name, bits, form, unproduced_outputs(model))


def test_pass_through_values_read_their_sources_parameters(exports):
    """The folded normalisation's own pair is what Flatten's reader reads (it used to get a copy,
    leaving `normalize.scale` unread); no copy of a pair is written for a pass-through value."""
    model = exports[("digits-mlp", 8)]["qoperator"]
    gemm = next(n for n in model.graph.node if n.op_type == "QGemm")
    assert list(gemm.input[1:3]) == ["normalize.scale", "normalize.zero_point"]
    names = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Flatten", "MaxPool"):
            assert f"{node.output[0]}.scale" not in names, node.output[0]


def test_builder_refuses_an_unread_initializer():
    """`finish` treats an unread initializer as an emitter bug (like an invalid graph)."""
    from qexport.onnx.builder import finish
    from qexport.ops.emit import Builder

    b = Builder()
    b.init("orphan", np.float32(1.0))
    b.node("Identity", ["input"], "logits")
    with pytest.raises(AssertionError, match="orphan"):
        finish(b, [3], [3], {})


class TokenMix(nn.Module):
    """A Linear on tokens and a transpose between two of them, as in a transformer."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(8, 8), nn.Linear(128, 10)

    def forward(self, x):
        t = self.a(x.reshape(x.shape[0], 8, 8))  # (N, 8 tokens, 16)
        return self.head(self.b(t.transpose(1, 2)).flatten(1))


def test_integer_files_move_uint8_values(exports, digits):
    """A move (reshape, flatten, transpose, max pool) of a quantized value moves the uint8 value in
    both integer forms, and no DequantizeLinear is computed only for a Shape (a token Linear's
    output shape): DequantizeLinear -> move -> QuantizeLinear moved four bytes per value, and cost
    deit_tiny's qdq file 1.2x onnxruntime's time."""
    import qexport

    torch.manual_seed(0)
    art = qexport.quantize(TokenMix().eval(), digits, "ptq", 8, per_channel=True, progress=False)
    files = {("tokens", form): qexport.to_onnx(art, None, form, digits, calib_batches=1) for form in ("qdq", "qoperator")}
    files.update({("pooled", form): exports[("pooled", 8)][form] for form in ("qdq", "qoperator")})
    for key, model in files.items():
        producer = {o: n.op_type for n in model.graph.node for o in n.output}
        readers: dict[str, list[str]] = {}
        for n in model.graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n.op_type)
        moves = [n for n in model.graph.node if n.op_type in ("Reshape", "Flatten", "Transpose", "MaxPool")]
        assert moves, key
        for n in moves:  # (a token Linear's rows of its DequantizeLinear: onnxruntime fuses them into QGemm)
            if readers.get(n.output[0]) != ["Gemm"]:
                assert producer.get(n.input[0]) != "DequantizeLinear", (key, n.name)
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear":
                assert set(readers.get(n.output[0], [])) != {"Shape"}, (key, n.name)
