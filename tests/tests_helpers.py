"""Helpers shared by the tests."""
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
