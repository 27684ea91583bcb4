"""`qexport sweep`: the minimal config as written, the JSONL schema, resume, a failing cell, Ctrl-C,
the Ray backend giving the same lines as the local one, config errors, and the report of a real sweep."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qexport.cli.main import main
from tests_helpers import HANG, sigint_default, wait_until

MINIMAL = 'datasets = ["digits"]\nmodels = ["mlp-digits"]\nmethods = ["ptq"]\nbits = [2, 4]\nseeds = [0]\n'
QEXPORT = [sys.executable, "-m", "qexport"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def minimal(tmp_path_factory):
    """The issue's minimal config, as written, run once with two workers."""
    d = tmp_path_factory.mktemp("sweep")
    (d / "grid.toml").write_text(MINIMAL)
    r = invoke("sweep", str(d / "grid.toml"), "-o", str(d / "results.jsonl"), "--workers", "2", "-q")
    assert r.exit_code == 0, r.output
    return d


def test_minimal_config_runs_two_cells_with_the_documented_schema(minimal):
    recs = lines(minimal / "results.jsonl")
    assert len(recs) == 2 and {r["cell"]["bits"] for r in recs} == {2, 4}
    for r in recs:
        assert r["schema"] == "qexport.sweep/1" and r["status"] == "ok" and r["error"] is None
        assert r["cell"] == {"dataset": "digits", "model": "mlp-digits", "method": "ptq", "params": {}, "bits": r["cell"]["bits"],
                             "scheme": None, "per_channel": False, "seed": 0, "export": None}
        assert r["scheme"] == "symmetric" and 90 < r["float_acc"] <= 100 and 50 < r["acc"] <= 100
        assert set(r["sizes"]) == {"model_bytes", "float_bytes", "artifact_bytes", "onnx_bytes"}
        assert r["sizes"]["model_bytes"] < r["sizes"]["float_bytes"] / 4 and r["sizes"]["onnx_bytes"] is None
        assert r["seconds"]["total"] >= r["seconds"]["quantize"] >= 0  # measured on a monotonic clock
        assert {"torch", "qexport", "numpy"} <= set(r["versions"]) and len(r["artifact_hash"]) == 64
        assert r["method_params"]["max_iter"] == 30 and r["data"]["name"] == "digits" and r["float_model"]["epochs"] > 0
    by_bits = {r["cell"]["bits"]: r for r in recs}
    assert by_bits[2]["sizes"]["model_bytes"] < by_bits[4]["sizes"]["model_bytes"]
    assert by_bits[2]["acc"] < by_bits[4]["acc"]  # 2-bit PTQ of this MLP loses accuracy, 4-bit nearly none
    assert list((minimal / "results.floats").glob("float-*.safetensors")), "the float model is cached beside the results"


def test_rerun_skips_finished_cells_and_a_removed_line_is_run_again(minimal, tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text((minimal / "results.jsonl").read_text())
    r = invoke("sweep", str(minimal / "grid.toml"), "-o", str(out), "-q", "--cache", str(minimal / "results.floats"))
    assert "0 ran" in r.output and "2 already done" in r.output and len(lines(out)) == 2
    first, second = out.read_text().splitlines()
    out.write_text(first + "\n" + second[: len(second) // 2])  # the second line torn, as a killed machine leaves it
    r = invoke("sweep", str(minimal / "grid.toml"), "-o", str(out), "-q", "--cache", str(minimal / "results.floats"))
    assert "1 already done, 1 ran" in r.output
    recs = lines(out)
    assert len(recs) == 2 and len({x["key"] for x in recs}) == 2
    assert {x["codes_hash"] for x in recs} == {x["codes_hash"] for x in lines(minimal / "results.jsonl")}  # same seed, same codes


def test_a_failing_cell_records_its_error_and_the_sweep_goes_on(minimal, tmp_path):
    (tmp_path / "bad.py").write_text("def boom(input_shape, num_classes):\n    raise RuntimeError('broken on purpose')\n")
    (tmp_path / "grid.toml").write_text(MINIMAL.replace('models = ["mlp-digits"]', 'models = ["mlp-digits", "bad.py:boom"]')
                                        .replace("bits = [2, 4]", "bits = [2]"))
    out = tmp_path / "r.jsonl"
    r = invoke("sweep", str(tmp_path / "grid.toml"), "-o", str(out), "-q", "--workers", "1", "--cache", str(minimal / "results.floats"))
    assert r.exit_code == 0 and "1 ran, 1 failed" in r.output
    bad = [x for x in lines(out) if x["status"] == "error"]
    assert len(bad) == 1 and bad[0]["cell"]["model"] == "bad.py:boom" and "broken on purpose" in bad[0]["error"]
    assert "\n" not in bad[0]["error"]
    report = invoke("report", str(out), "-o", str(tmp_path / "rep"))
    assert report.exit_code == 0 and "broken on purpose" in (tmp_path / "rep" / "report.md").read_text()


def test_export_and_verify_per_cell_then_the_report_renders(minimal, tmp_path):
    (tmp_path / "grid.toml").write_text(MINIMAL.replace("bits = [2, 4]", "bits = [4]") + 'methods_unused = 1\n')
    r = invoke("sweep", str(tmp_path / "grid.toml"), "-o", str(tmp_path / "x.jsonl"))
    assert r.exit_code == 2 and "unknown key 'methods_unused'" in r.output
    (tmp_path / "grid.toml").write_text(MINIMAL.replace('methods = ["ptq"]', 'methods = ["ptq", "gptq"]')
                                        + 'export = "qoperator"\nverify_samples = 300\n')
    out = tmp_path / "r.jsonl"
    r = invoke("sweep", str(tmp_path / "grid.toml"), "-o", str(out), "-q", "--cache", str(minimal / "results.floats"))
    assert r.exit_code == 0, r.output
    recs = lines(out)
    assert len(recs) == 4
    for x in recs:
        assert x["verify"]["passed"] and x["verify"]["form"] == "qoperator" and x["verify"]["samples"] == 300
        assert x["sizes"]["onnx_bytes"] > 0
    r = invoke("report", str(out), "-o", str(tmp_path / "rep"))
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| gptq |" in md and "2/2" not in md  # one seed per row
    figures = sorted(p.name for p in (tmp_path / "rep" / "figures").glob("*.png"))
    assert len(figures) == 5 and all((tmp_path / "rep" / "figures" / f).stat().st_size > 1000 for f in figures)  # 2 box plots, bits, size, time


@pytest.mark.parametrize("text, message", [
    ('datasets = ["digits"]\n', "missing models, methods, bits, seeds"),
    (MINIMAL.replace('"ptq"', '"ptqq"'), "unknown method 'ptqq'"),
    (MINIMAL.replace('"digits"', '"digitz"'), "dataset 'digitz' is neither"),
    (MINIMAL.replace("bits = [2, 4]", "bits = [2, 99]"), "bits"),
    (MINIMAL.replace("seeds = [0]", "seeds = []"), "'seeds' must be a non-empty list"),
    (MINIMAL.replace('methods = ["ptq"]', 'methods = [{name = "admm-q", params = {rho = -1}}]'), "rho"),
    (MINIMAL + "export = \"onnx\"\n", "export = 'onnx'"),
    ("datasets = [\n", "not valid TOML"),
    (MINIMAL.replace('"mlp-digits"', '"nonet.py:make"'), "model file"),
    (MINIMAL.replace('"mlp-digits"', '{name = "mlp-digits", normalize = "zscore"}'), "normalize = 'zscore'"),
    (MINIMAL + "[spec]\ncolour = [1]\n", "[spec] 'colour' is not a field a cell varies"),
    (MINIMAL + "[spec]\nlayer_bits = [{\"body.1\" = 9}]\n", "a bit width must be an integer from 1 to 8"),
])
def test_bad_configs_are_refused_in_one_line(tmp_path, text, message):
    (tmp_path / "grid.toml").write_text(text)
    r = invoke("sweep", str(tmp_path / "grid.toml"), "-o", str(tmp_path / "r.jsonl"))
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "r.jsonl").exists()


def test_output_is_not_the_config_nor_another_file(tmp_path):
    (tmp_path / "grid.toml").write_text(MINIMAL)
    r = invoke("sweep", str(tmp_path / "grid.toml"), "-o", str(tmp_path / "grid.toml"))
    assert r.exit_code == 2 and (tmp_path / "grid.toml").read_text() == MINIMAL
    (tmp_path / "notes.jsonl").write_text("my notes\n")
    r = invoke("sweep", str(tmp_path / "grid.toml"), "-o", str(tmp_path / "notes.jsonl"))
    assert r.exit_code == 2 and "not a sweep results file" in r.output
    assert (tmp_path / "notes.jsonl").read_text() == "my notes\n"


def test_ctrl_c_keeps_every_finished_line_and_the_rerun_finishes(minimal, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(MINIMAL.replace('methods = ["ptq"]', 'methods = ["ste"]').replace("bits = [2, 4]", "bits = [1, 2, 3, 4]")
                    + "budget = 4\n")
    out = tmp_path / "r.jsonl"
    cmd = QEXPORT + ["sweep", str(grid), "-o", str(out), "--workers", "1", "-q", "--cache", str(minimal / "results.floats")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=sigint_default)
    # pressed once the first cell's line is written (the other three cells take seconds more)
    wait_until(proc, lambda: out.is_file() and out.read_text().count("\n") >= 1, "a finished cell in the results")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "go on where it stopped" in stderr
    kept = lines(out)  # every line whole
    assert 1 <= len(kept) < 4
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=HANG)
    recs = lines(out)
    assert len(recs) == 4 and len({r["key"] for r in recs}) == 4 and all(r["status"] == "ok" for r in recs)


def test_ray_backend_gives_the_same_lines_as_the_local_one(minimal, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'qexport[ray]')")
    out = tmp_path / "ray.jsonl"
    r = invoke("sweep", str(minimal / "grid.toml"), "-o", str(out), "--backend", "ray", "--workers", "2", "-q",
               "--cache", str(minimal / "results.floats"))
    assert r.exit_code == 0, r.output
    drop = ("seconds", "worker", "finished", "artifact_hash")  # when and where it ran; the artifact's hash includes its timing
    local = sorted(({k: v for k, v in x.items() if k not in drop} for x in lines(minimal / "results.jsonl")), key=lambda x: x["key"])
    ray = sorted(({k: v for k, v in x.items() if k not in drop} for x in lines(out)), key=lambda x: x["key"])
    assert ray == local


def test_a_worker_that_dies_stops_the_sweep_with_one_line_and_keeps_finished_cells(minimal, tmp_path):
    import torch

    (tmp_path / "die.py").write_text("import os, signal\n\ndef make(input_shape, num_classes):\n"
                                     "    os.kill(os.getpid(), signal.SIGKILL)\n")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "w.pt")  # never loaded: the factory kills its process first
    (tmp_path / "grid.toml").write_text(MINIMAL.replace('models = ["mlp-digits"]',
                                                        'models = ["mlp-digits", {name = "die.py:make", checkpoint = "w.pt"}]'))
    out = tmp_path / "r.jsonl"
    r = invoke("sweep", str(tmp_path / "grid.toml"), "-o", str(out), "-q", "--workers", "1", "--cache", str(minimal / "results.floats"))
    # every cell still queued fails with the pool: the message names one of the die.py cells
    assert r.exit_code == 2 and "a worker process died running digits die.py:make@w.pt ptq" in r.output, r.output
    assert "the 2 cells finished are in" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert [x["cell"]["model"] for x in lines(out)] == ["mlp-digits", "mlp-digits"]


def test_any_spec_field_is_a_grid_axis(tmp_path):
    """[spec] varies QuantSpec fields the other keys do not: each combination is its own cell, its
    own request, its own row of the report."""
    (tmp_path / "grid.toml").write_text(MINIMAL.replace("bits = [2, 4]", "bits = [2]") +
                                        '[spec]\nlayer_bits = [{}, {"body.1" = 8}]\nkeep_last = [false, true]\n')
    r = invoke("sweep", str(tmp_path / "grid.toml"), "-o", str(tmp_path / "r.jsonl"), "-q")
    assert r.exit_code == 0, r.output
    recs = lines(tmp_path / "r.jsonl")
    assert sorted((json.dumps(x["cell"]["spec"]["layer_bits"]), x["cell"]["spec"]["keep_last"]) for x in recs) == [
        ('{"body.1": 8}', False), ('{"body.1": 8}', True), ("{}", False), ("{}", True)]
    assert len({x["key"] for x in recs}) == 4 and len({x["codes_hash"] for x in recs}) == 4
    r = invoke("report", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "rep"))
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("| 2 | ptq") == 4  # four rows, not one mean over four different requests
