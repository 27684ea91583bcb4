"""The CLI end to end on digits, and the one-line errors (exit status 2, no traceback, no file)."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from qexport.artifact import load_artifact
from qexport.cli import main
from tests_helpers import run_cli


def test_train_quantize_inspect(tmp_path):
    ck = tmp_path / "digits.safetensors"
    out = run_cli(["train", "--data", "digits", "--epochs", "30", "-q", "-o", str(ck)])
    assert "test" in out and ck.is_file() and ck.with_suffix(".json").is_file()
    card = json.loads(ck.with_suffix(".json").read_text())
    assert card["architecture"]["model"] == "mlp-digits" and card["training"]["test_acc"] > 90
    art = tmp_path / "d.qx.safetensors"
    out = run_cli(["quantize", "--checkpoint", str(ck), "--method", "ptq", "--bits", "8", "-q", "-o", str(art)])
    assert "quantized test accuracy" in out
    a = load_artifact(art)
    assert a.meta["method"]["name"] == "ptq" and a.meta["spec"]["bits"] == 8 and a.meta["spec"]["seed"] == 0
    assert a.meta["accuracy"]["quantized_test"] >= card["training"]["test_acc"] - 1.0
    assert a.meta["float_training"]["checkpoint"] == str(ck)
    for key in ("torch", "numpy", "qexport", "python"):
        assert key in a.meta["versions"]
    out = run_cli(["inspect", str(art)])
    assert "body.1" in out and "symmetric 8b" in out and "fp32" in out
    assert json.loads(run_cli(["inspect", "--json", str(art)]))["method"]["name"] == "ptq"


def test_same_seed_same_artifact(tmp_path):
    a, b = tmp_path / "a.qx.safetensors", tmp_path / "b.qx.safetensors"
    for p in (a, b):
        run_cli(["quantize", "--method", "ptq", "--bits", "2", "--epochs", "5", "-q", "-o", str(p)])
    la, lb = load_artifact(a), load_artifact(b)
    for name in la.layers:
        assert torch.equal(la.layers[name].q, lb.layers[name].q)


def test_user_factory_and_state_dict(tmp_path):
    from user_models import small_mlp

    model = small_mlp((1, 8, 8), 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    for ck in ("w.safetensors", "w.pt"):
        out = run_cli(["quantize", "--model", "user_models:small_mlp", "--checkpoint", str(tmp_path / ck),
                       "--method", "ptq", "--bits", "4", "-q", "-o", str(tmp_path / f"{ck}.qx.safetensors")])
        assert "quantized test accuracy" in out


ERRORS = [
    (["quantize", "--data", "nope"], "unknown dataset 'nope'"),
    (["quantize", "--model", "nope"], "unknown model 'nope'"),
    (["quantize", "--bits", "9"], "bits must be an integer from 1 to 8"),
    (["quantize", "--bits", "2", "--scheme", "binary"], "scheme 'binary' has 1 bit"),
    (["quantize", "--method", "nope"], "unknown method 'nope'"),
    (["quantize", "--checkpoint", "missing.safetensors"], "not found: missing.safetensors"),
    (["quantize", "--data", "pendigits", "--data-dir", "/nonexistent"], "/nonexistent/pendigits/pendigits.tra"),
    (["quantize", "-o", "no/such/folder/a.qx.safetensors"], "output folder no/such/folder does not exist"),
    (["quantize", "--param", "oops"], "write it as name=value"),
    (["quantize", "--method", "ptq", "--param", "rho=1"], "unknown hyperparameter(s) rho"),
    (["quantize", "--model", "user_models:with_sort"], "operator aten.sort.default is not one qexport runs"),
    (["quantize", "--normalize", "fit"], "--normalize is for your own model"),
    (["quantize", "--layer-bits", "body.1"], "write PATTERN=BITS"),
    (["quantize", "--method", "ptq", "--exclude", "nosuch*"], "nosuch*"),
    (["inspect", "missing.qx.safetensors"], "file not found"),
]


@pytest.mark.parametrize("args,message", ERRORS, ids=[e[1][:30] for e in ERRORS])
def test_errors_are_one_line_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, [*args, "-q"] if args[0] == "quantize" else args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_nan_csv_is_refused(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,y\n1,2,0\nnan,3,1\n" + "\n".join(f"{i},{i},{i % 2}" for i in range(20)))
    r = CliRunner().invoke(main, ["quantize", "--data", str(tmp_path / "d.csv"), "--label-column", "y", "-q",
                                  "-o", str(tmp_path / "x.qx.safetensors")])
    assert r.exit_code == 2 and "NaN" in r.output
    assert not (tmp_path / "x.qx.safetensors").exists()


def test_debug_shows_the_traceback():
    r = CliRunner().invoke(main, ["--debug", "quantize", "--data", "nope", "-q"])
    assert r.exit_code != 0 and r.exc_info is not None and "unknown dataset" in str(r.exception)
