"""`qexport sweep`: run a TOML grid of experiments, one JSON line per cell (qexport/sweep.py)."""
from __future__ import annotations

from pathlib import Path

import click

from qadmm.errors import UserError

EPILOG = """\b
A config (TOML); the cross product of the lists is the grid:
  datasets = ["digits"]                 # names or .npz/.csv files
  models = ["mlp-digits"]               # zoo names, file.py:factory, checkpoints,
                                        # or {name = "net.py:Net", checkpoint = "net.pt"}
  methods = ["ptq", {name = "admm-q", params = {rho = 0.01}}]
  bits = [2, 4]
  seeds = [0, 1, 2]
  # models = ["default"]: each dataset's own zoo model
  # optional: schemes = ["thesis"], per_channel = [true, false], export = "qoperator",
  # budget = 5 (epochs for every back-end that trains), data_dir = "../shared/data",
  # float_epochs = 20, verify_samples = 2000

\b
Examples:
  qexport sweep grid.toml -o results.jsonl               # one worker per core
  qexport sweep grid.toml -o results.jsonl --workers 1   # one at a time
  qexport sweep grid.toml -o results.jsonl --dry-run     # list the cells, run nothing
  qexport sweep grid.toml -o results.jsonl --backend ray --address auto   # on a Ray cluster
  qexport report results.jsonl -o report/
"""


@click.command(epilog=EPILOG)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="Results file (JSONL), appended to: cells already in it are skipped, so a stopped sweep resumes.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Parallel workers (default: one per core; torch threads are shared out among them).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: Ray tasks (pip install 'qexport[ray]').")
@click.option("--address", default=None, help="Ray cluster address (auto, ray://HEAD:10001); default: a local Ray instance.")
@click.option("--retry-failed", is_flag=True, help="Run again the cells whose earlier run failed.")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder for the float models the sweep trains (default: beside the results, NAME.floats/).")
@click.option("--dry-run", is_flag=True, help="Print the cells (and which are done) and exit.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no line per cell.")
def sweep(config, output, workers, backend, address, retry_failed, cache, dry_run, quiet):
    """Run every cell of a grid (datasets × models × methods × bits × schemes × seeds) and append one
    JSON line per cell to OUTPUT: accuracies, verify result, sizes, times, versions."""
    from qexport.fileio import check_output_path
    from qexport.sweep import describe_cell, load_config, read_results, run_sweep

    cfg = load_config(config)
    out = check_output_path(output, [config])
    if address and backend != "ray":
        raise UserError("--address is for --backend ray")
    done = {r["key"]: r for r in read_results(out)}
    cells = cfg.cells()
    if dry_run:
        for c in cells:
            rec = done.get(c.key)
            state = "todo" if rec is None else rec["status"]
            click.echo(f"{c.key}  {state:5s}  {c.dataset} {c.model} {c.method} {c.bits}b "
                       f"{c.scheme or ''}{' per-channel' if c.per_channel else ''} seed {c.seed} {c.params or ''}")
        click.echo(f"{len(cells)} cells, {sum(c.key in done for c in cells)} already in {out}")
        return
    from tqdm.auto import tqdm

    summary = run_sweep(cfg, out, workers=workers, backend=backend, address=address, retry_failed=retry_failed,
                        progress=not quiet, cache=cache, on_line=None if quiet else lambda r: tqdm.write(describe_cell(r)))
    head = "interrupted: " if summary.interrupted else ""
    click.echo(f"{head}{summary.cells} cells: {summary.skipped} already done, {summary.ok} ran, {summary.failed} failed "
               f"({summary.seconds:.0f} s); results in {out}")
    if summary.interrupted:
        click.echo("run the same command again to go on where it stopped", err=True)
        raise SystemExit(130)
    if summary.failed:
        click.echo(f"see the errors: qexport report {Path(out)} -o {Path(out).stem}-report/", err=True)
