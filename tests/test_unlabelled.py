"""Models whose output is not class scores, quantized from unlabelled inputs (issue: not only
classifiers, not only labelled data): the CLI end to end, and the refusals that go with it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qexport
from qadmm.errors import UserError
from tests_helpers import run_cli


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, digits):
    """The digits' pixels only, in [0, 1]: an .npz holding just `x`."""
    path = tmp_path_factory.mktemp("unlabelled") / "x.npz"
    np.savez(path, x=(np.concatenate([digits.x_train, digits.x_val, digits.x_test]) / 16.0).astype(np.float32))
    return path


@pytest.mark.parametrize("factory,out_shape", [("backbone", [4, 8, 8]), ("embedding", [16])])
def test_any_output_from_unlabelled_inputs_end_to_end(tmp_path, inputs, factory, out_shape):
    import user_models

    torch.manual_seed(0)
    model = getattr(user_models, factory)((1, 8, 8))
    with torch.no_grad():  # BatchNorm statistics of the inputs, as trained weights would have
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                model.train()
        model(torch.as_tensor(np.load(inputs)["x"][:512]))
    torch.save(model.eval().state_dict(), tmp_path / "w.pt")
    art = tmp_path / "m.qx.safetensors"
    out = run_cli(["quantize", "--model", f"user_models:{factory}", "--checkpoint", str(tmp_path / "w.pt"),
                   "--data", str(inputs), "--method", "gptq", "--bits", "4", "--per-channel", "-q", "-o", str(art)])
    assert "agreement with the float model on the test inputs: SQNR" in out, out
    meta = qexport.load(art).meta
    assert meta["architecture"]["output_shape"] == out_shape and "num_classes" not in meta["architecture"]
    assert meta["accuracy"]["quantized_test"] is None
    assert meta["agreement"]["sqnr_db"] > 15 and meta["agreement"]["cosine"] > 0.98, meta["agreement"]  # 4-bit gptq
    assert f"output {tuple(out_shape)}" in run_cli(["inspect", str(art)])
    for form in ("weights", "qdq", "qoperator"):
        onnx_path = tmp_path / f"{form}.onnx"
        run_cli(["to-onnx", str(art), "--form", form, "--data", str(inputs), "-o", str(onnx_path)])
        report = tmp_path / f"{form}.json"
        out = run_cli(["verify", str(onnx_path), "--artifact", str(art), "--data", str(inputs), "--report", str(report)])
        assert "PASSED" in out and "FAILED" not in out, out
        rep = json.loads(report.read_text())
        assert rep["accuracy"]["reference"] is None
        if form == "weights":  # float compute: the same function up to fp32 rounding
            assert all(r["sqnr_db"] is None or r["sqnr_db"] > 100 for r in rep["runs"].values()), rep["runs"]


def test_unlabelled_refusals(tmp_path, inputs, digits):
    import user_models

    model = user_models.embedding((1, 8, 8))
    x = np.load(inputs)["x"]
    with pytest.raises(UserError, match="method 'ste' trains on labels, and dataset 'arrays' has none: use ptq, gptq or ldnq"):
        qexport.quantize(model, x, "ste", 4)
    with pytest.raises(UserError, match=r"outputs \(4, 8, 8\) per sample, but dataset 'digits' has labels 0..9: .*unlabelled inputs"):
        qexport.quantize(user_models.backbone((1, 8, 8)), digits, "ptq", 4)
    with pytest.raises(UserError, match=r"^Sequential fails on an input of shape \(batch, 3\): RuntimeError: mat1 and mat2 "
                                        r"shapes cannot be multiplied[^\n]*$"):  # one line, the model's own error
        qexport.quantize(model, np.zeros((50, 3), np.float32), "ptq", 4)
    out = run_cli(["quantize", "--data", str(inputs), "-q", "-o", str(tmp_path / "z.qx.safetensors")], code=2)
    assert "has no labels: qexport's own models train on labels" in out
    out = run_cli(["quantize", "--model", "user_models:embedding", "--data", str(inputs), "-q"], code=2)
    assert "has no labels, so the model cannot be trained here: pass its trained weights with --checkpoint" in out
