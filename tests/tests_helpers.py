"""Helpers shared by the tests."""
import os
from pathlib import Path

import torch
from click.testing import CliRunner

from qexport.cli import main


def run_cli(args: list[str], code: int = 0) -> str:
    """Run `qexport ARGS` in-process; assert the exit status; return the output."""
    r = CliRunner().invoke(main, args)
    assert r.exit_code == code, f"exit {r.exit_code}: {r.output}\n{r.exc_info}"
    return r.output


def cnn_artifact(path: Path, digits, bits: int):
    """A PTQ artifact of an untrained cnn-small on digits (BatchNorm included) at `path`; the result."""
    from qadmm import methods
    from qadmm.spec import QuantSpec
    from qadmm.zoo import build_model
    from qexport.artifact import save_artifact

    torch.manual_seed(0)
    model = build_model("cnn-small", digits.input_shape, digits.num_classes, digits.mean, digits.std).eval()
    res = methods.quantize("ptq", model, digits, QuantSpec(bits=bits, progress=False))
    meta = {"architecture": {"model": "cnn-small", "input_shape": list(digits.input_shape), "num_classes": digits.num_classes},
            "preprocessing": {"mean": digits.mean.tolist(), "std": digits.std.tolist()}}
    save_artifact(path, res.model, res.layers, meta)
    return res


def sigint_default() -> None:
    """Popen's preexec_fn for tests that press Ctrl-C: a child inherits an ignored SIGINT from a
    test run started in the background (`cmd &`, nohup), and Python then keeps ignoring it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Hang guard for the processes the tests start: a loaded 2-core machine is slow, a hung one is stuck.
HANG = 600


def mapped(pid: int, library: str) -> bool:
    """Whether the process has loaded a shared library whose path contains `library` (Linux /proc)."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


def wait_until(proc, condition, what: str, timeout: float = HANG) -> None:
    """Poll `condition()` every millisecond while `proc` runs; fail naming `what` if it exits first.
    The tests that press Ctrl-C press it at a state of the child (a library loaded, a line printed),
    not after a delay, so a fast or a loaded machine presses it at the same point."""
    import time

    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited (status {proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.001)


def read_until(proc, marker: bytes, timeout: float = HANG) -> bytes:
    """Read the child's stderr until `marker` appears; return what was read."""
    import select
    import time

    seen = b""
    end = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while marker not in seen:
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"no {marker!r} on stderr after {timeout} s: {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"stderr closed before {marker!r}: {seen[-500:]!r}")
            seen += chunk
    return seen
