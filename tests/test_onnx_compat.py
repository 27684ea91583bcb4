"""Which onnxruntime loads a file: `qexport.onnx.compat` maps a file's opset, IR version and late
kernels to the oldest release, `to-onnx` prints it in one line with the `--opset` that reaches an
older runtime, and the file's metadata records it."""
from __future__ import annotations

import onnx
import pytest

from tests_helpers import run_cli


@pytest.mark.parametrize("opset, ir, release", [
    (13, 7, "1.6"), (19, 9, "1.16"), (20, 9, "1.17"), (21, 10, "1.18"), (22, 10, "1.21"), (23, 11, "1.23"),
    (25, 13, "1.24"), (13, 11, "1.23"), (27, 13, None),
])
def test_table_gives_the_oldest_release_with_the_files_opset_and_ir(opset, ir, release):
    from qexport.onnx.compat import oldest_onnxruntime

    assert oldest_onnxruntime(opset, ir) == release


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, digits):
    """{bits: path} of the shipped digits MLP quantized with PTQ (and "thesis8": thesis 8-bit codes, INT16)."""
    import qexport
    from qexport.checkpoint import load_checkpoint

    tmp = tmp_path_factory.mktemp("compat")
    model, _ = load_checkpoint("models/digits-mlp.safetensors")
    out = {}
    for key, bits, scheme in ((2, 2, None), (4, 4, None), ("thesis8", 8, "thesis")):
        path = tmp / f"d{key}.qx.safetensors"
        qexport.quantize(model, digits, "ptq", bits, scheme=scheme, per_channel=True, calib_samples=64).save(path)
        out[key] = path
    return out


def to_onnx(art, tmp_path, *args) -> tuple[str, onnx.ModelProto]:
    out = tmp_path / "m.onnx"
    text = run_cli(["to-onnx", str(art), "-o", str(out), "-q", "--calib-batches", "1", *args])
    return text.strip().splitlines()[-1], onnx.load(str(out))


@pytest.mark.parametrize("bits, line", [
    # INT4 codes need opset 21 (1.18), but Cast from INT4 only came in 1.23 (1.18-1.22 refuse the file)
    (4, "loads in onnxruntime >= 1.23 (opset 21, IR 10; Cast from INT4 since 1.23); "
        "for an older runtime use --opset 13 (onnxruntime >= 1.6)"),
    (2, "loads in onnxruntime >= 1.24 (opset 25, IR 13); for an older runtime use --opset 13 (onnxruntime >= 1.6)"),
])
def test_default_weights_export_names_its_runtime_and_the_opset_for_older_ones(artifacts, tmp_path, bits, line):
    last, model = to_onnx(artifacts[bits], tmp_path, "--form", "weights")
    assert last == line
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qexport.min_opset"] == "13" and meta["qexport.min_onnxruntime"] == line.split(">= ")[1].split(" ")[0]


def test_dequantizelinear_variant_needs_int4_tensors_only(artifacts, tmp_path):
    """DequantizeLinear reads INT4 from 1.19 on (1.18 has no INT4 tensors at all); only Cast needs 1.23."""
    last, _ = to_onnx(artifacts[4], tmp_path, "--form", "weights", "--dequant", "dequantizelinear")
    assert last == ("loads in onnxruntime >= 1.19 (opset 21, IR 10; INT4 tensors since 1.19); "
                    "for an older runtime use --opset 13 (onnxruntime >= 1.6)")


def test_opset_13_export_suggests_nothing_lower(artifacts, tmp_path):
    last, model = to_onnx(artifacts[4], tmp_path, "--form", "weights", "--opset", "13")
    assert last == "loads in onnxruntime >= 1.6 (opset 13, IR 7)"
    assert model.opset_import[0].version == 13 and model.ir_version == 7
    assert {i.data_type for i in model.graph.initializer if i.name.endswith(".codes")} == {onnx.TensorProto.INT8}


def test_integer_forms_name_the_contrib_operators_floor(artifacts, tmp_path):
    """qoperator uses com.microsoft QGemm, not in onnxruntime's table: no release older than the
    oldest one checked (1.15) is claimed; --opset 21 is lowered back to 13 in the advice."""
    last, _ = to_onnx(artifacts[4], tmp_path, "--form", "qoperator")
    assert last == "loads in onnxruntime >= 1.15 (opset 13, IR 7; com.microsoft operators, checked from 1.15)"
    last, _ = to_onnx(artifacts[4], tmp_path, "--form", "qdq", "--opset", "21")
    assert last == "loads in onnxruntime >= 1.18 (opset 21, IR 10); for an older runtime use --opset 13 (onnxruntime >= 1.6)"


def test_no_opset_is_suggested_that_the_builder_refuses(artifacts, tmp_path):
    """Thesis 8-bit codes (±255) need INT16, which needs opset 21: nothing lower is offered."""
    last, model = to_onnx(artifacts["thesis8"], tmp_path, "--form", "weights")
    assert last == "loads in onnxruntime >= 1.18 (opset 21, IR 10)"
    assert {p.key: p.value for p in model.metadata_props}["qexport.min_opset"] == "21"
    run_cli(["to-onnx", str(artifacts["thesis8"]), "-o", str(tmp_path / "x.onnx"), "--form", "weights", "--opset", "20"], code=2)
