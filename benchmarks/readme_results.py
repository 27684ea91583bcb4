"""Put the committed sweep reports' tables and figures into the README, between the markers

    <!-- results:NAME -->  ...  <!-- /results:NAME -->

where NAME is a folder under benchmarks/reports/ (written by `qexport report`). The README's
results are then generated, never pasted:

    python benchmarks/readme_results.py            # rewrite the README's blocks
    python benchmarks/readme_results.py --reports  # first rebuild each report from its results
    python benchmarks/readme_results.py --check    # exit 1 when a block differs from its report

Report NAME is built from benchmarks/results/NAME.jsonl (the sweep of benchmarks/sweeps/NAME.toml)
and every benchmarks/results/NAME.*.jsonl beside it (NAME.torch-int8.jsonl: PyTorch's int8 paths on
the same float models, `benchmarks/torch_int8.py --jsonl`), against the shipped thesis reference:
what `qexport report benchmarks/results/NAME.jsonl benchmarks/results/NAME.*.jsonl -o
benchmarks/reports/NAME` writes.

Each block gets the report's tables (one per dataset × model) and, per dataset × model, its
accuracy-against-bits figure; the box plots and the other figures stay in the report.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REPORTS = ROOT / "benchmarks" / "reports"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # qexport from this checkout (for --reports)
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def block(name: str) -> str:
    """The README text for report `name`: its sections from the first dataset heading on, figure
    paths made relative to the README, box plots left out."""
    folder = REPORTS / name
    md = (folder / "report.md").read_text(encoding="utf-8")
    start = md.find("\n## ")
    sections = re.split(r"(?m)^(?=## )", md[start + 1:])
    keep = [s for s in sections if not s.startswith("## Failed cells")]
    text = "".join(keep)
    text = re.sub(r"(?m)^!\[[^\]]*\]\(figures/[^)]*-box\.png\)\n\n?", "", text)
    text = text.replace("](figures/", f"]({folder.relative_to(ROOT).as_posix()}/figures/")
    text = re.sub(r"(?m)^## ", "#### ", text)
    link = f"[{folder.relative_to(ROOT).as_posix()}/report.md]({folder.relative_to(ROOT).as_posix()}/report.md)"
    return f"Generated from {link} (`python benchmarks/readme_results.py`); box plots per bit width there.\n\n{text.strip()}\n"


def rebuild_report(name: str) -> list[Path]:
    """benchmarks/reports/NAME from NAME.jsonl and the NAME.*.jsonl beside it; the files read."""
    from qexport.report import load_reference, load_results, write_report

    files = [RESULTS / f"{name}.jsonl", *sorted(RESULTS.glob(f"{name}.*.jsonl"))]
    write_report(load_results(*files), REPORTS / name, load_reference(), inputs=files)
    return files


def render(readme: str) -> str:
    def sub(m: re.Match) -> str:
        return m.group(1) + block(m.group("name")) + m.group(4)

    return BLOCK.sub(sub, readme)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the README is stale")
    ap.add_argument("--reports", action="store_true", help="first rebuild every report the README shows from its results")
    args = ap.parse_args()
    text = README.read_text(encoding="utf-8")
    if args.reports:
        for name in dict.fromkeys(m.group("name") for m in BLOCK.finditer(text)):
            files = rebuild_report(name)
            print(f"benchmarks/reports/{name}: from {', '.join(f.name for f in files)}")
    new = render(text)
    if args.check:
        if new != text:
            print("README.md results blocks differ from benchmarks/reports/: run python benchmarks/readme_results.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    print(f"README.md: {len(BLOCK.findall(text))} results block(s) regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
