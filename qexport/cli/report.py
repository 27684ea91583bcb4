"""`qexport report`: a sweep's results as tables and figures (report.md, figures/, report.html)."""
from __future__ import annotations

from pathlib import Path

import click

EPILOG = """\b
Examples:
  qexport report sweep.jsonl -o sweep-report/                 # report.md + figures/*.png
  qexport report sweep.jsonl -o sweep-report/ --html          # and one self-contained report.html
  qexport report sweep.jsonl -o r/ --reference my-paper.json  # compare with your own numbers
  qexport report sweep.jsonl -o r/ --no-reference             # no reference columns
  qexport report ours.jsonl torch-int8.jsonl -o r/            # several results files, one report
"""


@click.command(epilog=EPILOG)
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(), default=None, metavar="DIR",
              help="Folder for the report (created if its parent exists; default: the first RESULTS's name with -report).")
@click.option("--reference", "reference_file", type=click.Path(dir_okay=False), default=None,
              help="Reference accuracies to compare with, a JSON file (format: docs/sweeps.md). "
                   "Default: the thesis's tables shipped with qexport.")
@click.option("--no-reference", is_flag=True, help="No reference and difference columns.")
@click.option("--html", "as_html", is_flag=True, help="Also write report.html with the figures embedded (one file).")
def report(results, output, reference_file, no_reference, as_html):
    """Summarise a sweep's results (JSONL; several files are read as one): mean ± std over seeds
    per method and bit width, set beside a reference, with box plots and accuracy/size/time figures.

    Failed cells are listed with their errors; a cell that was rerun counts once (its last line).
    The same results give byte-identical files.
    """
    from qadmm.errors import UserError
    from qexport.report import aggregate, best_per_bits, check_out_dir, load_reference, load_results, split_results, write_report

    if reference_file and no_reference:
        raise UserError("--reference and --no-reference exclude each other: give one")
    path = Path(results[0])
    out = check_out_dir(output if output else path.with_name(path.stem + "-report"), [*results, reference_file])
    cells = load_results(*results)
    ref = None if no_reference else load_reference(reference_file)
    files = write_report(cells, out, ref, as_html, inputs=[*results, reference_file])
    ok, failed = split_results(cells)
    click.echo(f"wrote {files.markdown}" + (f", {files.html}" if files.html else "")
               + f" and {len(files.figures)} figures in {out / 'figures'}/")
    click.echo(f"cells: {len(ok)} ok, {len(failed)} failed" + (" (listed in report.md)" if failed else ""))
    for (ds, model), best in best_per_bits(aggregate(ok)).items():
        click.echo(f"{ds} · {model}, best mean accuracy per bit width:")
        for bits, row in sorted(best.items()):
            click.echo(f"  {bits} bit{'s' * (bits > 1):1s}  {row.label:14s} {row.code_set:22s} "
                       f"{row.mean:6.2f} ± {row.std:5.2f}  (n={row.n})")
