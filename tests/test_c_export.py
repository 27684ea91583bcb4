"""`qexport to-c --float-mlp`: the float MLP C99 sources compile warning-free with gcc and match the PyTorch fake-quant
reference on real digits test inputs; the C unpacker reads every width the packer writes."""
import shutil
import subprocess

import numpy as np
import pytest
import torch

from qadmm import methods
from qadmm.errors import UserError
from qadmm.spec import QuantSpec
from qadmm.zoo import build_model
from qexport.pack import bitpack
from qexport.artifact import save_artifact
from qexport.pack.c_export import export_c
from qexport.pack.packfile import load_packed
from test_packfile import make_artifact
from tests_helpers import cnn_artifact, run_cli

CC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(CC is None, reason="no gcc on PATH: install a C compiler (e.g. apt-get install gcc) to run the C export tests")
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O2"]


def build(outdir, *sources):
    exe = outdir / "qmodel"
    r = subprocess.run([CC, *CFLAGS, *map(str, sources), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, f"gcc failed:\n{r.stderr}"
    return exe


@needs_gcc
@pytest.mark.parametrize("cfg", [(1, None, False, False), (2, None, True, False), (3, "thesis", False, True), (8, "thesis", True, False)],
                         ids=["binary1", "ternary-pc", "thesis3-keepfirst", "thesis8-pc-9bit"])
def test_c_matches_pytorch_reference(tmp_path, digits, digits_mlp, cfg):
    art = make_artifact(tmp_path / "a.qx.safetensors", digits, digits_mlp, *cfg)
    out = tmp_path / "c"
    run_cli(["to-c", str(tmp_path / "a.qx.safetensors"), "--float-mlp", "-o", str(out)])
    exe = build(out, out / "qmodel.c", out / "qmodel_main.c")
    x = digits.x_test.reshape(len(digits.x_test), -1)
    np.savetxt(tmp_path / "in.txt", x, fmt="%.9g")
    r = subprocess.run([str(exe), str(tmp_path / "in.txt")], capture_output=True, text=True, check=True)
    got = np.loadtxt(r.stdout.splitlines(), ndmin=2)
    ref = art.model(torch.as_tensor(digits.x_test)).detach().numpy()
    assert got.shape == (len(x), 1 + digits.num_classes)
    assert np.abs(got[:, 1:] - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.array_equal(got[:, 0].astype(int), ref.argmax(1))


def run_c(tmp_path, art, x):
    """Export `art` to C, build the desktop driver, run it on samples x; returns (classes, logits)."""
    out = tmp_path / "c"
    export_c(load_packed(art), out)
    exe = build(out, out / "qmodel.c", out / "qmodel_main.c")
    np.savetxt(tmp_path / "in.txt", x.reshape(len(x), -1), fmt="%.9g")
    r = subprocess.run([str(exe), str(tmp_path / "in.txt")], capture_output=True, text=True, check=True)
    got = np.loadtxt(r.stdout.splitlines(), ndmin=2)
    return got[:, 0].astype(int), got[:, 1:]


@needs_gcc
def test_c_per_feature_normalisation_on_pendigits(tmp_path, shared_data):
    """Tabular data: one mean/std per input feature (QMODEL_NORM_SIZE 16), 3498 real test samples."""
    from qadmm.data import load_dataset

    data = load_dataset("pendigits", data_dir=shared_data, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp-pendigits", data.input_shape, data.num_classes, data.mean, data.std).eval()
    res = methods.quantize("ptq", model, data, QuantSpec(bits=4, per_channel=True, progress=False))
    meta = {"architecture": {"model": "mlp-pendigits", "input_shape": list(data.input_shape), "num_classes": data.num_classes},
            "preprocessing": {"mean": data.mean.tolist(), "std": data.std.tolist()}}
    save_artifact(tmp_path / "p.qx.safetensors", res.model, res.layers, meta)
    cls, logits = run_c(tmp_path, tmp_path / "p.qx.safetensors", data.x_test)
    ref = res.model.eval()(torch.as_tensor(data.x_test)).detach().numpy()
    assert "#define QMODEL_NORM_SIZE 16" in (tmp_path / "c" / "qmodel_config.h").read_text()
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.array_equal(cls, ref.argmax(1))


@needs_gcc
def test_c_unpacker_reads_every_width(tmp_path, digits, digits_mlp):
    """qmodel_code() against bitpack.pack for widths 1..9 and sizes that straddle bytes."""
    make_artifact(tmp_path / "a.qx.safetensors", digits, digits_mlp, 2)
    out = tmp_path / "c"
    export_c(load_packed(tmp_path / "a.qx.safetensors"), out)
    rng = np.random.default_rng(0)
    arrays, calls, expect = [], [], []
    for width in range(1, 10):
        enc = bitpack.SIGN if width == 1 else bitpack.TWOS_COMPLEMENT
        lo, hi = bitpack.code_range(width, enc)
        q = rng.choice([-1, 1], 37) if width == 1 else rng.integers(lo, hi + 1, 37)
        data = bitpack.pack(q, width, enc)
        arrays.append(f"static const uint8_t p{width}[{data.size}] = {{{', '.join(map(str, data))}}};")
        calls.append(f"    for (i = 0; i < 37u; ++i) printf(\"%ld \", (long)qmodel_code(p{width}, i, {width}u, "
                     f"{'QM_SIGN' if width == 1 else 'QM_TWOS_COMPLEMENT'}));\n    printf(\"\\n\");")
        expect.append(q.tolist())
    main = out / "test_main.c"
    main.write_text("#include <stdio.h>\n#include \"qmodel.h\"\n" + "\n".join(arrays) +
                    "\nint main(void)\n{\n    uint32_t i;\n" + "\n".join(calls) + "\n    return 0;\n}\n")
    exe = build(out, out / "qmodel.c", main)
    got = [list(map(int, line.split())) for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()]
    assert got == expect


def test_refuses_non_mlp_models(tmp_path, digits):
    path = tmp_path / "cnn.qx.safetensors"
    cnn_artifact(path, digits, bits=4)
    with pytest.raises(UserError, match="MLPs only .* body.0 is conv"):
        export_c(load_packed(path), tmp_path / "c")
    msg = run_cli(["to-c", str(path), "--float-mlp", "-o", str(tmp_path / "c2")], code=2)
    assert msg.startswith("error: ") and "qexport to-onnx" in msg
    assert not (tmp_path / "c").exists() and not (tmp_path / "c2").exists()  # nothing written
