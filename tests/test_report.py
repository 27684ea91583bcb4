"""`qexport report` on synthetic sweep results: tables, reference, figures, HTML, determinism and
the one-line errors. No training; a few seconds (most of it drawing the figures)."""
import json

import pytest
from click.testing import CliRunner

from qadmm.errors import BadData
from qexport.cli import main
from qexport.report import aggregate, load_reference, load_results, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def record(ds, model, method, bits, seed, acc, scheme="symmetric", error=None, **extra):
    """One line of a sweep's results file (schema qexport.sweep/1)."""
    cell = {"dataset": ds, "model": model, "method": method, "params": {}, "bits": bits,
            "scheme": "thesis" if scheme == "thesis" else None, "per_channel": False, "seed": seed, "export": "qoperator"}
    rec = {"schema": "qexport.sweep/1", "key": f"{ds}/{model}/{method}/{scheme}/{bits}/{seed}", "cell": cell,
           "status": "error" if error else "ok", "error": error}
    if not error:
        rec.update({"scheme": scheme, "float_acc": 97.0, "acc": acc,
                    "verify": {"form": "qoperator", "passed": seed != 2, "agreement": 100.0},
                    "sizes": {"model_bytes": 256 * bits + 64, "float_bytes": 8192, "artifact_bytes": 9000, "onnx_bytes": None},
                    "seconds": {"quantize": 0.1 * bits, "total": 0.5 * bits + seed}, "artifact_hash": "ab" * 32,
                    "versions": {"qexport": "0.1.0", "torch": "2.13.0"}, "finished": "2026-11-24T10:00:00Z",
                    "a_newer_key": {"ignored": True}})
    rec.update(extra)
    return rec


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# 3 methods x bits 1/2/4 x 3 seeds on digits, one failed cell, and LQ at thesis 2 bits on mnist
BASE = {"ptq": 60.0, "lq": 80.0, "ste": 75.0}
RECORDS = ([record("digits", "mlp-digits", m, b, s, BASE[m] + 4 * b + 2 * s) for m in BASE for b in (1, 2, 4) for s in range(3)]
           + [record("mnist", "mlp-mnist", "lq", 2, s, acc, scheme="thesis") for s, acc in enumerate((80.0, 84.0, 85.0))]
           + [record("digits", "mlp-digits", "gptq", 2, 0, None, error="gptq: layer body.1 has no calibration inputs")])
N_FIGURES = (3 + 3) + (1 + 3)  # per (dataset, model): a box plot per bit width, then bits, size and time


def cli(args, code=0):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == code, r.output
    return r.output


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of RECORDS written by the CLI with --html: (results path, output folder, stdout)."""
    tmp = tmp_path_factory.mktemp("report")
    results = write_jsonl(tmp / "sweep.jsonl", RECORDS)
    out = cli(["report", str(results), "-o", str(tmp / "rep"), "--html"])
    return results, tmp / "rep", out


def test_markdown_tables_reference_and_failures(report):
    _, rep, out = report
    md = (rep / "report.md").read_text()
    assert "30 ok, 1 failed" in md and "30 ok, 1 failed" in out
    assert "digits, mlp-digits, gptq, 2 bits, seed 0: gptq: layer body.1 has no calibration inputs" in md
    # ptq at 2 bits: 60 + 8 + {0, 2, 4} -> mean 70, sample std 2; model (256*2+64)/1024 KiB; s/cell 1 + {0,1,2}
    # (digits has no thesis numbers: its table has no reference columns)
    assert "| 2 | ptq | symmetric | 3 | 70.00 ± 2.00 | 97.00 | 0.6 | 2.00 | 2/3 |" in md
    # mnist LQ thesis 2 bits: 83.00 ± 2.65 beside the thesis's 82.61 ± 23.69, within one std
    assert "| 2 | lq | thesis | 3 | 83.00 ± 2.65 | 97.00 | 82.61 ± 23.69 (LQ) | ≈ +0.39 |" in md
    assert "reference (thesis)" in md and "thesis: float 95.33 ± 0.27" in md
    assert "2 bits  lq" in out  # best method per bit width in the summary


def test_figures_are_pngs_referenced_by_relative_path(report):
    _, rep, _ = report
    pngs = sorted((rep / "figures").glob("*.png"))
    assert len(pngs) == N_FIGURES
    md = (rep / "report.md").read_text()
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
        assert f"](figures/{p.name})" in md


def test_html_is_self_contained(report):
    _, rep, _ = report
    page = (rep / "report.html").read_text()
    assert page.count("data:image/png;base64,") == N_FIGURES
    assert 'src="figures/' not in page and "<link" not in page and "<script" not in page
    assert "82.61 ± 23.69" in page


def test_same_results_same_bytes(report, tmp_path):
    results, rep, _ = report
    files = write_report(load_results(results), tmp_path / "again", load_reference(), html=True)
    assert files.markdown.read_bytes() == (rep / "report.md").read_bytes()
    assert files.html.read_bytes() == (rep / "report.html").read_bytes()
    assert len(files.figures) == N_FIGURES
    for p in files.figures:
        assert p.read_bytes() == (rep / "figures" / p.name).read_bytes(), p.name


def test_rerun_keeps_last_line_and_extra_keys_are_ignored(tmp_path):
    first = record("digits", "mlp-digits", "ptq", 4, 0, 10.0)
    again = record("digits", "mlp-digits", "ptq", 4, 0, 90.0)
    results = load_results(write_jsonl(tmp_path / "r.jsonl", [first, record("digits", "mlp-digits", "ptq", 4, 1, 92.0), again]))
    assert len(results) == 2
    (row,) = aggregate(results)
    assert row.accs == (90.0, 92.0) and row.n == 2 and row.mean == 91.0


def test_several_results_files_make_one_report(tmp_path):
    """Ours and PyTorch's int8 baselines (benchmarks/torch_int8.py --jsonl) in one table, matched
    with the thesis's DQ row; a bad line in the second file is named by that file."""
    ours = write_jsonl(tmp_path / "ours.jsonl", [record("seeds", "mlp-seeds", "lq", 8, s, 90.0, scheme="thesis") for s in range(2)])
    torch_rows = [record("seeds", "mlp-seeds", "torch-dynamic", 8, s, 91.0, scheme="int8") for s in range(2)]
    theirs = write_jsonl(tmp_path / "torch.jsonl", torch_rows)
    cli(["report", str(ours), str(theirs), "-o", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "report.md").read_text()
    (table,) = [b for b in md.split("## ")[1:] if b.startswith("seeds · mlp-seeds")]
    assert "| 8 | lq | thesis | 2 | 90.00 ± 0.00 |" in table
    assert "| 8 | torch-dynamic | int8 | 2 | 91.00 ± 0.00 |" in table and "(DQ)" in table
    bad = write_jsonl(tmp_path / "bad.jsonl", [torch_rows[0], {"schema": "other/2"}])
    r = CliRunner().invoke(main, ["report", str(ours), str(bad), "-o", str(tmp_path / "rep2")])
    assert r.exit_code == 2 and f"{bad} line 2" in r.output and not (tmp_path / "rep2").exists(), r.output


@pytest.mark.parametrize("line,message", [
    ('{"schema": "qexport.sweep/1", "key": "x", "cell": {', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: not a JSON object"),
    ('{"schema": "other/2"}', "line 2: schema is 'other/2'"),
    (json.dumps(record("d", "m", "ptq", 2, 0, "high")), "line 2: an ok cell needs 'acc'"),
])
def test_malformed_line_is_one_line_exit_2(tmp_path, line, message):
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(BadData, match=message.split(": ", 1)[1][:20]):
        load_results(results)
    r = CliRunner().invoke(main, ["report", str(results), "-o", str(tmp_path / "rep")])
    lines = [s for s in r.output.splitlines() if s.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
    assert f"{results} line 2" in lines[0] and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def small(tmp_path):
    return write_jsonl(tmp_path / "r.jsonl", [record("mnist", "mlp-mnist", "lq", 2, s, 70.0 + s, scheme="thesis") for s in range(2)])


def test_user_reference_and_no_reference(tmp_path):
    results = small(tmp_path)
    ref = tmp_path / "paper.json"
    ref.write_text(json.dumps({"name": "my-paper", "source": "me", "metric": "test accuracy",
                               "rows": [{"dataset": "mnist", "method": "lq", "scheme": "thesis", "bits": 2,
                                         "mean": 75.0, "std": 1.0, "label": "LQ-paper"}],
                               "float": {"mnist": [96.0, 0.5]}}))
    cli(["report", str(results), "-o", str(tmp_path / "a"), "--reference", str(ref)])
    md = (tmp_path / "a" / "report.md").read_text()
    assert "reference (my-paper)" in md and "75.00 ± 1.00 (LQ-paper) | ▼ -4.50 |" in md and "82.61" not in md
    cli(["report", str(results), "-o", str(tmp_path / "b"), "--no-reference"])
    md = (tmp_path / "b" / "report.md").read_text()
    assert "reference" not in md.lower() and "difference" not in md and "| 2 | lq | thesis | 2 | 70.50 ± 0.71 |" in md


@pytest.mark.parametrize("doc,message", [
    ({"rows": []}, "'name' must be a non-empty string"),
    ({"name": "x", "rows": [{"dataset": "mnist", "method": "lq", "scheme": "thesis", "bits": "2", "mean": 1}]},
     "rows[0]: 'bits' must be a positive integer"),
])
def test_bad_reference_file_is_one_line(tmp_path, doc, message):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(doc))
    r = CliRunner().invoke(main, ["report", str(small(tmp_path)), "-o", str(tmp_path / "rep"), "--reference", str(ref)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and message in r.output and str(ref) in r.output, r.output
    assert not (tmp_path / "rep").exists()


def test_output_that_is_a_file_or_the_input_is_refused(tmp_path):
    results = small(tmp_path)
    (tmp_path / "taken.txt").write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, message in ((tmp_path / "taken.txt", "is not a folder"), (results, "is the input")):
        r = CliRunner().invoke(main, ["report", str(results), "-o", str(out)])
        assert r.exit_code == 2 and r.output.startswith("error:") and message in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "taken.txt").read_text() == "keep me"


def test_shipped_thesis_reference():
    ref = load_reference()
    assert ref.name == "thesis" and ref.float_acc["mnist"] == (95.33, 0.27)
    lq = [r for r in ref.rows if (r.dataset, r.method, r.bits) == ("mnist", "lq", 2)]
    assert [(r.scheme, r.mean, r.std, r.label) for r in lq] == [("thesis", 82.61, 23.69, "LQ")]
    assert {r.method for r in ref.rows if r.scheme == "int8"} == {"torch-dynamic", "torch-static", "torch-qat"}


def test_help_has_examples():
    out = cli(["report", "--help"])
    assert "Examples:" in out and "--no-reference" in out and "--html" in out
