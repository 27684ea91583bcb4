"""`qexport` / `python -m qexport`: the command line, started so that a Ctrl-C while torch is
still importing (before click runs) prints one line instead of a traceback, and so that torch's
OpenMP threads sleep rather than spin while they wait (OMP_WAIT_POLICY=PASSIVE unless set): on a
machine where another job holds a core, a spinning thread keeps the core that its descheduled
partner needs (resnet18 gptq: 2.10x slower with one other job when spinning, 1.62x when sleeping,
and about the same time on a quiet machine; docs/speed.md)."""
from __future__ import annotations

import os
import signal
import sys


def interrupted(*_) -> None:
    """Leave at once: an interrupted import leaves modules half-initialised, and a normal exit
    would run their cleanup code (and print its tracebacks). Nothing has been written yet."""
    sys.stdout.flush()
    sys.stderr.write("interrupted: nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


def entry() -> None:
    previous = signal.signal(signal.SIGINT, interrupted)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads its OpenMP runtime
    from qexport.cli.main import main

    signal.signal(signal.SIGINT, previous)  # from here on Ctrl-C raises KeyboardInterrupt: outputs clean up
    main()


if __name__ == "__main__":
    entry()
