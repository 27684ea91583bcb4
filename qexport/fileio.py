"""Every file qexport reads or writes passes here: safetensors read with clear errors, outputs
checked against the command's inputs and written atomically (temp file + rename), provenance."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from qadmm.errors import BadFile, OutputConflict, UserError

PathLike = str | Path


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file (symlinks, `./x` vs `x`, hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def check_output_path(path: PathLike, inputs: Iterable[PathLike | None] = (), others: Iterable[PathLike | None] = ()) -> Path:
    """`path` as an output: its folder exists, it is not a folder, and it is none of the command's
    `inputs` (files it reads) nor its `others` (its other outputs). Called before any work."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist: create it first or choose another -o path")
    if path.is_dir():
        raise UserError(f"output path {path} is a folder: give a file name")
    for p in inputs:
        if p is not None and _same(path, Path(p)):
            raise OutputConflict(f"output {path} is the input {p}: writing it would destroy the input; choose another -o path")
    for p in others:
        if p is not None and _same(path, Path(p)):
            raise OutputConflict(f"output {path} would also be written as {p} by this command: choose another -o path")
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on any error (or
    Ctrl-C) delete it, so a reader never sees a half-written file."""
    path = check_output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # read-only folder, disk full: name the user's path, not the temp file's
        raise UserError(f"cannot write {path}: {e.strerror or e} (choose another -o path or fix the folder's permissions)") from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e} (choose another -o path)") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_bytes(path: PathLike) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _parse_header(raw: bytes, path: PathLike) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and where the tensor data begins, every rule checked (the
    header fits the file, each tensor's byte range lies inside the data, no gaps or overlaps)."""
    def bad(why: str) -> BadFile:
        return BadFile(f"{path} is not a valid safetensors file ({why}): is it truncated, corrupted or not a qexport file?")

    if len(raw) < 8:
        raise bad(f"only {len(raw)} bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    if n < 2 or 8 + n > len(raw):
        raise bad(f"header of {n} bytes in a {len(raw)}-byte file")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("metadata is not a map of strings")
    return header, 8 + n


def read_header(path: PathLike) -> dict[str, str]:
    """The safetensors string metadata, with clear errors for missing, foreign and truncated files
    (read by Python, so any path the OS accepts works)."""
    header, _ = _parse_header(read_bytes(path), path)
    return dict(header.get("__metadata__", {}))


def read_safetensors(path: PathLike, numpy: bool = False) -> tuple[dict[str, str], dict[str, Any]]:
    """(string metadata, tensors) of a safetensors file: torch tensors, or numpy arrays."""
    raw = read_bytes(path)
    header, _ = _parse_header(raw, path)
    try:
        if numpy:
            from safetensors.numpy import load
        else:
            from safetensors.torch import load
        tensors = load(raw)
    except Exception as e:  # safetensors raises its own error types for every malformed layout
        raise BadFile(f"{path}: cannot read its tensors ({str(e).splitlines()[0]}); the file is truncated or corrupted") from None
    return dict(header.get("__metadata__", {})), tensors


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
