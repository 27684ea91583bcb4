"""Helpers shared by the CLI tests."""
from click.testing import CliRunner

from qexport.cli import main


def run_cli(args: list[str], code: int = 0) -> str:
    """Run `qexport ARGS` in-process; assert the exit status; return the output."""
    r = CliRunner().invoke(main, args)
    assert r.exit_code == code, f"exit {r.exit_code}: {r.output}\n{r.exc_info}"
    return r.output
