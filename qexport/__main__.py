"""`qexport` / `python -m qexport`: the command line, started so that a Ctrl-C while torch is
still importing (before click runs) prints one line instead of a traceback."""
from __future__ import annotations

import sys


def entry() -> None:
    try:
        from qexport.cli.main import main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was written\n")
        raise SystemExit(130) from None
    main()


if __name__ == "__main__":
    entry()
