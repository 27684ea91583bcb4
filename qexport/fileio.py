"""Writing outputs atomically (temp file + rename) and provenance shared by every command."""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from qadmm.errors import UserError


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist: create it first or choose another -o path")
    if path.is_dir():
        raise UserError(f"output path {path} is a folder: give a file name")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on any error (or
    Ctrl-C) delete it, so a reader never sees a half-written file."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def versions() -> dict[str, str]:
    """Package versions recorded in every output's metadata."""
    import numpy
    import torch

    import qexport

    out = {"qexport": qexport.__version__, "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for mod in ("onnx", "onnxruntime"):
        if mod in sys.modules:
            out[mod] = sys.modules[mod].__version__
    return out
