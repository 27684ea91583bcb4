"""Careless and hostile input, by class (issue 15): every case must end in one `error: …` line
and exit status 2 (exit 1 only for a verification that ran and failed), with no input
overwritten, nothing half-written, and nothing a file names ever imported or called."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from qadmm.errors import BadData, BadFile, BadValue, OutputConflict, UserError
from qexport.artifact import content_hash, load_artifact
from qexport.cli import main
from qexport.fileio import read_safetensors
from tests_helpers import HANG, mapped, read_until, sigint_default, wait_until

ROOT = Path(__file__).resolve().parents[1]
FASHION_CNN = ROOT / "models" / "fashion-cnn-small.safetensors"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(args: list[str], message: str, code: int = 2) -> str:
    """Run the CLI in-process: one `error:` line containing `message`, exit `code`, no traceback."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == code, f"exit {r.exit_code}: {r.output}\n{r.exc_info}"
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert message in lines[0], r.output
    assert "Traceback" not in r.output and "internal error" not in r.output
    return lines[0]


def user_factory(folder: Path) -> str:
    """A user's factory file (the digits MLP's architecture, written as user code): its --model value."""
    (folder / "zoo_like.py").write_text("from qadmm.zoo import build_model\nimport numpy as np\n"
                                        "def make():\n    return build_model('mlp-digits', (1, 8, 8), 10, np.zeros((1, 1, 1)), np.ones((1, 1, 1)))\n")
    return f"{folder}/zoo_like.py:make"


def files(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in folder.iterdir() if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Fixtures: one real artifact, its packed file, its ONNX export, a float checkpoint.

@pytest.fixture(scope="module")
def made(tmp_path_factory, digits, digits_mlp):
    import qexport

    d = tmp_path_factory.mktemp("made")
    art = qexport.quantize(digits_mlp, digits, "ptq", 2, seed=0)
    art.save(d / "m.qx.safetensors")
    qexport.to_onnx(art, d / "m.onnx", "weights")
    CliRunner().invoke(main, ["pack", str(d / "m.qx.safetensors"), "-o", str(d / "m.qpk.safetensors")])
    from qexport.checkpoint import save_checkpoint

    meta = {"architecture": {"model": "mlp-digits", "input_shape": list(digits.input_shape), "num_classes": 10},
            "preprocessing": {"type": "standardize", "mean": digits.mean.tolist(), "std": digits.std.tolist()}}
    save_checkpoint(d / "f.safetensors", digits_mlp, meta)
    np.save(d / "x.npy", digits.x_test[:16])
    return d


def forge(src: Path, dst: Path, meta_fn=None, tensors_fn=None) -> Path:
    """A copy of artifact `src` with its metadata and tensors edited and the content hash
    recomputed: what a careful forger writes (the hash alone cannot catch it)."""
    header, tensors = read_safetensors(src)
    meta = json.loads(header["qexport"])
    if meta_fn:
        meta_fn(meta)
    if tensors_fn:
        tensors_fn(tensors)
    meta_json = json.dumps(meta, sort_keys=True)
    save_file(tensors, str(dst), metadata={**header, "qexport": meta_json, "content_sha256": content_hash(tensors, meta_json)})
    return dst


def first_layer(meta) -> str:
    return sorted(meta["layers"])[0]


def _set(tensors, prefix, fn):
    name = sorted(k for k in tensors if k.startswith(prefix))[0]
    tensors[name] = fn(tensors[name].clone())


def _code(value):
    def fn(q):
        q.view(-1)[0] = value
        return q
    return fn


def _scale(value):
    def fn(a):
        a.view(-1)[0] = value
        return a
    return fn


FORGERIES = {
    "code 5 in a 2-bit layer": (None, lambda t: _set(t, "codes/", _code(5)), "outside symmetric 2-bit"),
    "code 100 in a '3-bit' layer": (lambda m: m["layers"][first_layer(m)].update(bits=3, storage_bits=3),
                                    lambda t: _set(t, "codes/", _code(100)), "outside symmetric 3-bit"),
    "negative scale": (None, lambda t: _set(t, "scale/", _scale(-0.5)), "finite and positive"),
    "NaN scale": (None, lambda t: _set(t, "scale/", _scale(float("nan"))), "finite and positive"),
    "infinite scale": (None, lambda t: _set(t, "scale/", _scale(float("inf"))), "finite and positive"),
    "zero scale": (None, lambda t: _set(t, "scale/", _scale(0.0)), "finite and positive"),
    "scales of the wrong length": (None, lambda t: _set(t, "scale/", lambda a: torch.ones(3)), "scale has shape (3,)"),
    "missing codes tensor": (None, lambda t: t.pop(sorted(k for k in t if k.startswith("codes/"))[0]), "missing tensor"),
    "missing bias": (None, lambda t: t.pop(sorted(k for k in t if k.endswith(".bias"))[0]), "missing"),
    "codes of the wrong shape": (None, lambda t: _set(t, "codes/", lambda q: q[:-1].contiguous()), "declares"),
    "codes stored as float": (None, lambda t: _set(t, "codes/", lambda q: q.float()), "codes are torch.float32"),
    "NaN bias": (None, lambda t: _set(t, "float/body.1.bias", _scale(float("nan"))), "NaN or infinite"),
    "absurd input shape": (lambda m: m["architecture"].update(input_shape=[100000, 100000, 100000]), None, "absurd"),
    "absurd layer width": (lambda m: [o["attrs"].update(in_features=10**12) for o in m["graph"]["ops"] if o["kind"] == "linear"][:1],
                           None, "wrong shape"),
    "unknown op kind": (lambda m: m["graph"]["ops"][0].update(kind="os.system"), None, "unknown op kind"),
    "stray tensor": (None, lambda t: t.update({"codes/ghost": torch.zeros(2, dtype=torch.int8)}), "not declared"),
    "codes on a BatchNorm": (lambda m: m["layers"].update({"body.0": dict(m["layers"][first_layer(m)])}), None, "missing tensor"),
    "class count off": (lambda m: m["architecture"].update(num_classes=7), None, "declares 7 classes"),
}


@pytest.mark.parametrize("case", list(FORGERIES))
def test_forged_artifacts_are_refused_before_any_export(made, tmp_path, case):
    meta_fn, tensors_fn, message = FORGERIES[case]
    bad = forge(made / "m.qx.safetensors", tmp_path / "bad.qx.safetensors", meta_fn, tensors_fn)
    with pytest.raises(BadFile, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_artifact(bad)
    before = files(tmp_path)
    for args in (["to-onnx", bad, "--form", "weights", "-o", tmp_path / "x.onnx"], ["pack", bad, "-o", tmp_path / "x.qpk"],
                 ["inspect", bad], ["to-c", bad, "-o", tmp_path / "c"]):
        refused(args, "")
    assert files(tmp_path) == before and not (tmp_path / "c").exists()


def test_forged_packed_file_is_refused_and_pack_output_always_unpacks(made, tmp_path):
    from safetensors.numpy import save_file as save_np

    from qexport.pack.packfile import content_hash as packed_hash

    header, tensors = read_safetensors(made / "m.qpk.safetensors", numpy=True)
    layers = json.loads(header["layers"])
    layers[0]["bits"] = 4  # declared 4-bit, stored at 2 bits: the width no longer matches
    meta = {k: v for k, v in header.items() if k != "content_sha256"}
    meta["layers"] = json.dumps(layers)
    save_np(tensors, str(tmp_path / "bad.qpk"), metadata={**meta, "content_sha256": packed_hash(tensors, meta)})
    refused(["unpack", tmp_path / "bad.qpk", "-o", tmp_path / "u.qx.safetensors"], "the file says 2-bit")
    # a code outside the set but inside the stored width (-2 in symmetric 2-bit), hash recomputed
    t2 = dict(tensors)
    name = layers[0]["packed"]
    t2[name] = t2[name].copy()
    t2[name][0] = 0b10  # first code := -2 (two's complement, LSB first)
    orig = {k: v for k, v in header.items() if k != "content_sha256"}
    save_np(t2, str(tmp_path / "bad2.qpk"), metadata={**orig, "content_sha256": packed_hash(t2, orig)})
    refused(["unpack", tmp_path / "bad2.qpk", "-o", tmp_path / "u.qx.safetensors"], "outside")
    assert not (tmp_path / "u.qx.safetensors").exists()
    CliRunner().invoke(main, ["unpack", str(made / "m.qpk.safetensors"), "-o", str(tmp_path / "ok.qx.safetensors")])
    assert torch.equal(load_artifact(tmp_path / "ok.qx.safetensors").layers["body.1"].q,
                       load_artifact(made / "m.qx.safetensors").layers["body.1"].q)


# ---------------------------------------------------------------------------------------------
# Data loss: an output that is an input (or another output) is refused before any work.

COLLISIONS = [
    (["quantize", "--checkpoint", "{d}/f.safetensors", "--method", "ptq", "-q", "-o", "{d}/f.safetensors"], "is the input"),
    (["quantize", "--checkpoint", "{d}/f.safetensors", "--method", "ptq", "-q", "-o", "{d}/f.json"], "is the input"),
    (["quantize", "--data", "{d}/data.npz", "--method", "ptq", "-q", "-o", "{d}/data.npz"], "is the input"),
    (["train", "--epochs", "1", "-q", "-o", "{d}/model.json"], "would also be written"),
    (["to-onnx", "{d}/m.qx.safetensors", "--form", "weights", "-o", "{d}/m.qx.safetensors"], "is the input"),
    (["pack", "{d}/m.qx.safetensors", "-o", "{d}/m.qx.safetensors"], "is the input"),
    (["pack", "{d}/m.qx.safetensors", "-o", "{d}/link.qx.safetensors"], "is the input"),
    (["unpack", "{d}/m.qpk.safetensors", "-o", "{d}/m.qpk.safetensors"], "is the input"),
    (["run", "{d}/m.onnx", "--input", "{d}/x.npy", "-o", "{d}/x.npy"], "is the input"),
    (["run", "{d}/m.onnx", "--input", "{d}/x.npy", "-o", "{d}/m.onnx"], "is the input"),
    (["verify", "{d}/m.onnx", "--artifact", "{d}/m.qx.safetensors", "--data", "digits", "--report", "{d}/m.onnx"], "is the input"),
]


@pytest.mark.parametrize("args,message", COLLISIONS, ids=[" ".join(a[:1] + a[-1:]) for a, _ in COLLISIONS])
def test_an_output_that_is_an_input_is_refused(made, tmp_path, digits, args, message):
    for f in ("m.qx.safetensors", "m.qpk.safetensors", "m.onnx", "x.npy", "f.safetensors", "f.json"):
        (tmp_path / f).write_bytes((made / f).read_bytes())
    (tmp_path / "link.qx.safetensors").symlink_to(tmp_path / "m.qx.safetensors")
    (tmp_path / "model.json").write_text("{}")
    np.savez(tmp_path / "data.npz", x_train=digits.x_train, y_train=digits.y_train, x_test=digits.x_test, y_test=digits.y_test)
    before = files(tmp_path)
    refused([a.format(d=tmp_path) for a in args], message)
    assert files(tmp_path) == before  # nothing overwritten, nothing new


def test_to_c_refuses_to_overwrite_its_input(made, tmp_path):
    (tmp_path / "qmodel.h").write_bytes((made / "m.qx.safetensors").read_bytes())
    before = files(tmp_path)
    refused(["to-c", tmp_path / "qmodel.h", "-o", tmp_path], "is the input")
    assert files(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Code named by a file: never imported, never called.

def test_names_in_files_are_never_imported_or_called(made, tmp_path):
    """A version-1 artifact and a checkpoint that name `tempfile:mkdtemp` as their model: loading
    them must refuse, and no folder may appear in TMPDIR (the call would create one)."""
    def v1(meta):
        meta.pop("graph")
        meta["architecture"]["model"] = "tempfile:mkdtemp"

    forge(made / "m.qx.safetensors", tmp_path / "evil.qx.safetensors", v1)
    header, tensors = read_safetensors(made / "f.safetensors")
    meta = json.loads(header["qexport"])
    meta.pop("graph", None)
    meta["architecture"]["model"] = "tempfile:mkdtemp"
    save_file(tensors, str(tmp_path / "evil.safetensors"), metadata={**header, "qexport": json.dumps(meta)})
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    code = ("import sys; from click.testing import CliRunner; from qexport.cli import main\n"
            "for args in (['inspect', sys.argv[1]], ['to-onnx', sys.argv[1], '--form', 'weights', '-o', sys.argv[3]],\n"
            "             ['quantize', '--checkpoint', sys.argv[2], '--method', 'ptq', '-q', '-o', sys.argv[3]]):\n"
            "    r = CliRunner().invoke(main, args); print(r.exit_code, r.output.strip())\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "evil.qx.safetensors"), str(tmp_path / "evil.safetensors"),
                          str(tmp_path / "out.bin")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=HANG)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all(ln.startswith("2 error:") and "never imports" in ln for ln in lines), out.stdout + out.stderr
    assert list(tmpdir.iterdir()) == [] and not (tmp_path / "out.bin").exists()


# ---------------------------------------------------------------------------------------------
# Bad numbers.

BAD_NUMBERS = [
    (["train", "--lr", "inf"], "not a finite number"),
    (["train", "--lr", "nan"], "not a finite number"),
    (["quantize", "--lr", "nan"], "not a finite number"),
    (["quantize", "--seed", "-1"], "--seed"),
    (["train", "--seed", "-3"], "--seed"),
    (["quantize", "--method", "ste", "--param", "lr=nan"], "lr=nan: must be a finite number"),
    (["quantize", "--method", "ste", "--param", "lr=0"], "lr=0.0: must be positive"),
    (["quantize", "--method", "lq", "--param", "rho=-1"], "rho > 0"),
    (["quantize", "--method", "ptq", "--param", "max_iter=0"], "max_iter=0: must be positive"),
    (["quantize", "--method", "gptq", "--param", "bn_samples=-5"], "bn_samples=-5: must be 0 or positive"),
    (["quantize", "--method", "lq", "--param", "retrain_epochs=-2"], "retrain_epochs >= 0"),
    (["quantize", "--method", "lq", "--param", "joint=maybe"], "expected true or false"),
    (["quantize", "--batch-size", "0"], "--batch-size"),
    (["to-onnx", "{d}/m.qx.safetensors", "--percentile", "nan"], "not a finite number"),
    (["to-onnx", "{d}/m.qx.safetensors", "--percentile", "0"], "--percentile"),
    (["verify", "{d}/m.onnx", "--artifact", "{d}/m.qx.safetensors", "--min-agreement", "101"], "--min-agreement"),
    (["verify", "{d}/m.onnx", "--artifact", "{d}/m.qx.safetensors", "--rel-tol", "inf"], "not a finite number"),
]


@pytest.mark.parametrize("args,message", BAD_NUMBERS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_refused_up_front(made, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    args = [a.format(d=made) for a in args]
    refused(args + (["-q"] if args[0] in ("train", "quantize") else []), message)
    assert list(tmp_path.iterdir()) == []


def test_nan_weights_in_checkpoints_are_refused(made, tmp_path, digits_mlp):
    header, tensors = read_safetensors(made / "f.safetensors")
    tensors["body.1.weight"] = tensors["body.1.weight"].clone()
    tensors["body.1.weight"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=header)
    refused(["quantize", "--checkpoint", tmp_path / "nan.safetensors", "--method", "ptq", "-q", "-o", tmp_path / "o"], "NaN")
    state = {k: v.clone() for k, v in digits_mlp.state_dict().items()}
    state["body.3.bias"][1] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    factory = user_factory(tmp_path)
    refused(["quantize", "--model", factory, "--checkpoint", tmp_path / "inf.pt", "--method", "ptq",
             "-q", "-o", tmp_path / "o"], "NaN or infinite")
    assert not (tmp_path / "o").exists()


def test_diverging_training_stops_with_an_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(["train", "--lr", "1e30", "--epochs", "3", "-q", "-o", tmp_path / "f.safetensors"], "diverged")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Tracebacks: data layouts, corrupted data files, foreign files, user code that fails.

def _npz(path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def test_bad_dataset_layouts(tmp_path, digits):
    x, y = digits.x_train, digits.y_train
    img = np.random.default_rng(0).uniform(0, 255, size=(40, 28, 28, 1)).astype(np.float32)
    nhwc = _npz(tmp_path / "nhwc.npz", img, np.arange(40) % 10, img, np.arange(40) % 10)
    refused(["quantize", "--model", "cnn-small", "--data", nhwc, "--checkpoint", FASHION_CNN, "--method", "ptq", "-q",
             "-o", tmp_path / "o"], "channels-last")
    onehot = _npz(tmp_path / "onehot.npz", x, np.eye(10)[y], digits.x_test, digits.y_test)
    refused(["quantize", "--data", onehot, "--method", "ptq", "-q", "-o", tmp_path / "o"], "one-hot")
    frac = _npz(tmp_path / "frac.npz", x, y + 0.5, digits.x_test, digits.y_test)
    refused(["quantize", "--data", frac, "--method", "ptq", "-q", "-o", tmp_path / "o"], "fractional")
    (tmp_path / "head.csv").write_text("a,b,label\n")
    refused(["quantize", "--data", tmp_path / "head.csv", "--label-column", "label", "-q", "-o", tmp_path / "o"], "no data rows")
    (tmp_path / "ragged.csv").write_text("a,b,label\n1,2,0\n3,1\n")
    refused(["quantize", "--data", tmp_path / "ragged.csv", "--label-column", "label", "-q", "-o", tmp_path / "o"], "every row")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    refused(["quantize", "--data", tmp_path / "bad.npz", "-q", "-o", tmp_path / "o"], "cannot read")
    (tmp_path / "mnist").mkdir()
    good = gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 1000)
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(good[:20] + b"\xff" * 40 + good[60:])
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(good[:30])
    refused(["quantize", "--data", "mnist-10k", "--data-dir", tmp_path, "-q", "-o", tmp_path / "o"], "cannot read IDX file")
    assert not (tmp_path / "o").exists()
    with pytest.raises(BadData, match="one-hot"):
        from qadmm.data import from_arrays

        from_arrays("a", x, np.eye(10)[y], digits.x_test, digits.y_test)


def test_run_never_reshapes_channels_last_silently(made, tmp_path, digits):
    np.save(tmp_path / "nhwc.npy", digits.x_test[:8].transpose(0, 2, 3, 1))
    refused(["run", made / "m.onnx", "--input", tmp_path / "nhwc.npy", "-o", tmp_path / "p.npy"], "channels-last")
    np.save(tmp_path / "flat.npy", digits.x_test[:8].reshape(8, -1))  # flat features are reshaped: that is exact
    CliRunner().invoke(main, ["run", str(made / "m.onnx"), "--input", str(tmp_path / "flat.npy"), "-o", str(tmp_path / "p.npy")])
    assert np.load(tmp_path / "p.npy").shape == (8, 10)


def test_foreign_truncated_and_unrelated_onnx_files(made, tmp_path, digits):
    raw = (made / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "text.onnx").write_text("not a model\n" * 20)
    verify = ["--artifact", made / "m.qx.safetensors", "--data", "digits"]
    refused(["verify", tmp_path / "cut.onnx", *verify], "")
    refused(["verify", tmp_path / "text.onnx", *verify], "")
    refused(["verify", made / "m.qx.safetensors", *verify], "")  # an artifact where the ONNX file goes
    refused(["run", tmp_path / "cut.onnx", "--data", "digits"], "")
    refused(["verify", made / "m.onnx", "--artifact", made / "m.onnx", "--data", "digits"], "")  # and the reverse
    # a real ONNX model of another network: refused by its signature, not by a crash
    import qexport
    from qexport.onnx.runner import load_onnx

    x = np.random.default_rng(0).normal(size=(64, 1, 4, 4)).astype(np.float32)
    small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    other = qexport.quantize(small, (x, np.arange(64) % 3, x, np.arange(64) % 3), "ptq", 4)
    qexport.to_onnx(other, tmp_path / "other.onnx", "weights")
    refused(["verify", tmp_path / "other.onnx", *verify], "not exported from this artifact")
    with pytest.raises(BadFile):
        load_onnx(tmp_path / "cut.onnx")


def test_user_code_that_fails(tmp_path, digits_mlp):
    (tmp_path / "broken_import.py").write_text("raise RuntimeError('no GPU driver')\ndef make():\n    pass\n")
    (tmp_path / "raising.py").write_text("def make():\n    raise KeyError('layers')\n")
    (tmp_path / "notmodel.py").write_text("def make():\n    return 42\n")
    (tmp_path / "syntax.py").write_text("def make(:\n")
    for f, msg in (("broken_import", "RuntimeError: no GPU driver"), ("raising", "raised KeyError"),
                   ("notmodel", "returned int"), ("syntax", "SyntaxError")):
        refused(["quantize", "--model", f"{tmp_path}/{f}.py:make", "--method", "ptq", "-q", "-o", tmp_path / "o"], msg)
    # a state_dict whose keys do not fit: the message names the keys, in full
    state = {f"encoder.{k}": v for k, v in digits_mlp.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    factory = user_factory(tmp_path)
    line = refused(["quantize", "--model", factory, "--checkpoint", tmp_path / "w.safetensors", "-q",
                    "-o", tmp_path / "o"], "does not fit the model")
    assert "missing body.1.bias" in line and "unexpected encoder.body.1.bias" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="watches the child through Linux /proc")
@pytest.mark.parametrize("moment", ["torch starts importing", "torch's C++ core loaded", "training"])
def test_ctrl_c_is_one_line_at_any_moment(tmp_path, moment):
    """Ctrl-C while torch imports or while training: one line, exit 130, nothing written.

    Pressed at a state of the process, not after a delay, so every machine presses it at the same
    point: the first torch library mapped (torch/__init__ has begun), torch's Python bindings mapped
    (its C++ core is in, its Python modules are loading: most of the import), or the first training
    progress on stderr. (Before torch, in the first tens of milliseconds, the interpreter itself is
    starting: Python's own handler applies there, not qexport's.)"""
    p = subprocess.Popen([sys.executable, "-m", "qexport", "quantize", "-o", str(tmp_path / "o")], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=sigint_default)
    seen = b""
    if moment == "training":
        seen = read_until(p, b"train float")
    else:
        library = "libtorch_global_deps" if moment == "torch starts importing" else "libtorch_python"
        wait_until(p, lambda: mapped(p.pid, library), f"{library} loaded")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=HANG)
    err = (seen + err).decode()
    assert p.returncode == 130 and err.rstrip().endswith("interrupted: nothing was written"), (p.returncode, err[-2000:])
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_the_command_lets_openmp_threads_sleep_unless_told_otherwise(made, given):
    """On a machine another job shares, spinning OpenMP threads keep the core their descheduled
    partner needs (docs/speed.md): the command sets OMP_WAIT_POLICY=PASSIVE before torch loads,
    and a value the user set stays. GNU OpenMP shows its settings on request; its spin count tells
    PASSIVE (0) from its default (300000) and from ACTIVE, which both show other counts."""
    env = {**os.environ, "OMP_DISPLAY_ENV": "VERBOSE"}
    env.pop("OMP_WAIT_POLICY", None)
    if given:
        env["OMP_WAIT_POLICY"] = given
    r = subprocess.run([sys.executable, "-m", "qexport", "inspect", str(made / "m.qx.safetensors")], capture_output=True,
                       cwd=ROOT, env=env, timeout=HANG, text=True)
    spin = [line.split("=")[1].strip() for line in r.stderr.splitlines() if line.strip().startswith("GOMP_SPINCOUNT")]
    if not spin:
        pytest.skip("torch's OpenMP runtime here is not GNU OpenMP")
    assert r.returncode == 0 and (spin[0] == "'0'") == (given is None), spin


# ---------------------------------------------------------------------------------------------
# Messages that must not mislead.

def test_a_valid_file_at_a_non_utf8_path_loads(made, tmp_path):
    odd = os.fsencode(tmp_path) + b"/caf\xe9.qx.safetensors"
    with open(odd, "wb") as f:
        f.write((made / "m.qx.safetensors").read_bytes())
    assert load_artifact(os.fsdecode(odd)).sha256 == load_artifact(made / "m.qx.safetensors").sha256
    r = subprocess.run([sys.executable, "-m", "qexport", "inspect", odd], capture_output=True, cwd=ROOT, timeout=HANG)
    assert r.returncode == 0 and b"qexport artifact" in r.stdout, r.stderr


def test_an_unwritable_output_is_named_by_its_path(tmp_path, monkeypatch):
    import tempfile

    from qexport.fileio import atomic_path

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".out.bin.x1y2z3.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(UserError) as e:
        with atomic_path(tmp_path / "out.bin"):
            pass
    assert str(tmp_path / "out.bin") in str(e.value) and ".tmp" not in str(e.value) and "Permission denied" in str(e.value)


def test_a_pickled_checkpoint_is_refused_without_unsafe_advice(tmp_path, digits_mlp):
    torch.save({"state": digits_mlp.state_dict(), "opt": torch.optim.SGD(digits_mlp.parameters(), lr=0.1)}, tmp_path / "c.pt")
    factory = user_factory(tmp_path)
    line = refused(["quantize", "--model", factory, "--checkpoint", tmp_path / "c.pt", "-q",
                    "-o", tmp_path / "o"], "pickled objects")
    assert "weights_only=False" not in line


def test_typed_errors_for_api_users(made, tmp_path):
    with pytest.raises(OutputConflict):
        from qexport.fileio import check_output_path

        check_output_path(made / "m.onnx", [made / "m.onnx"])
    with pytest.raises(BadValue):
        from qadmm.spec import QuantSpec

        QuantSpec(seed=-1).validate()


def test_every_module_imports_on_its_own():
    """A user's script may import any module first (`from qexport.ops.integer import qadd`): none
    may depend on another having been imported before it (an import cycle did)."""
    code = """
import importlib, pkgutil, sys
import qadmm, qexport
names = [m.name for p in (qadmm, qexport) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
failed = []
for name in names:
    for k in [k for k in sys.modules if k.split(".")[0] in ("qadmm", "qexport")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print(len(names))
print("\\n".join(failed))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0, out.stderr
    count, *failed = out.stdout.strip().split("\n")
    assert int(count) > 40 and failed == [], failed
