"""The README's Python examples run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README shows Python usage"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "model.onnx").is_file()


def test_readme_results_are_the_committed_reports():
    """The README's results blocks are generated from benchmarks/reports/ (never pasted by hand)."""
    import subprocess
    import sys

    text = README.read_text()
    names = re.findall(r"<!-- results:([\w.-]+) -->", text)
    assert names, "the README's results come from committed sweep reports"
    for name in names:
        assert (README.parent / "benchmarks" / "reports" / name / "report.md").is_file(), name
    r = subprocess.run([sys.executable, str(README.parent / "benchmarks" / "readme_results.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
