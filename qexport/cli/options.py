"""What the commands share: the error handling of the `qexport` group, option types that refuse
bad numbers, the common option sets, and which arguments name input files."""
from __future__ import annotations

import math

import click

from qadmm.errors import UserError


class Group(click.Group):
    """Bad input becomes one line on stderr and exit status 2 (the traceback only with --debug);
    an unexpected exception, a bug, one line naming it and exit status 3."""

    def invoke(self, ctx: click.Context):
        def debug() -> bool:  # set by the group's callback, which runs inside super().invoke
            return bool((ctx.obj or {}).get("debug"))

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.UsageError as e:  # a bad option value or name: one line with the fix
            if debug():
                raise
            cmd = f"qexport {e.ctx.info_name} --help" if e.ctx is not None and e.ctx.parent is not None else "qexport --help"
            click.echo(f"error: {e.format_message()} (see {cmd})", err=True)
            ctx.exit(2)
        except (UserError, OSError) as e:
            if debug():
                raise
            msg = str(e) if isinstance(e, UserError) else f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
            click.echo(f"error: {msg}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:  # half-written outputs were removed on the way here (atomic_path)
            from qexport.__main__ import interrupted

            interrupted()
        except Exception as e:
            if debug():
                raise
            detail = (str(e).strip().splitlines() or [""])[0][:300]
            click.echo(f"error: internal error ({type(e).__name__}: {detail}); this is a bug in qexport: rerun with "
                       "--debug for the traceback and report it", err=True)
            ctx.exit(3)


class Finite(click.FloatRange):
    """A float option that refuses NaN and infinity (click's FloatRange lets both through)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


SEED = click.IntRange(0, 2**32 - 1)


def data_file(data_name: str | None) -> str | None:
    """The dataset file a --data value names (None for a dataset name)."""
    return data_name if data_name and data_name.endswith((".npz", ".csv")) else None


def factory_file(model_name: str | None) -> str | None:
    """The .py file a --model path/to/file.py:factory names (None otherwise)."""
    target = (model_name or "").rpartition(":")[0]
    return target if target.endswith(".py") else None


def data_options(f):
    f = click.option("--label-column", default=None, help="Label column of a .csv dataset.")(f)
    f = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Folder with DIR/<dataset>/<original files> (default: $QEXPORT_DATA, else ./data).")(f)
    f = click.option("--data", "data_name", default="digits", show_default=True,
                     help="Dataset name (digits, seeds, pendigits, mnist, mnist-10k, fashion-mnist, cifar10, cifar100) "
                          "or a path to a .npz / .csv file (an .npz of x_train, y_train, x_test, y_test; or just x: "
                          "unlabelled inputs, for ptq/gptq/ldnq and models of any output).")(f)
    return f


def normalize_option(f):
    return click.option("--normalize", default=None, metavar="none|fit|MEAN,STD",
                        help="Standardise the input in front of YOUR model (module:factory): none (default: the "
                             "model gets the raw features, as you trained it), fit (mean/std of the training split), "
                             "or MEAN,STD. Zoo models and qexport checkpoints carry their own.")(f)


def train_options(f):
    f = click.option("--epochs", type=click.IntRange(1), default=None, help="Float training epochs (default per dataset).")(f)
    f = click.option("--lr", type=Finite(0, min_open=True), default=3e-3, show_default=True, help="Adam learning rate.")(f)
    f = click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)(f)
    f = click.option("--patience", type=click.IntRange(1), default=30, show_default=True, help="Early-stopping patience (epochs).")(f)
    return f


def parse_bits(text: str, option: str = "--bit-choices") -> list[int]:
    """Bit widths 1..8 from "8,4,2,1", widest first."""
    try:
        bits = sorted({int(b) for b in text.split(",")}, reverse=True)
    except ValueError:
        raise UserError(f"{option} {text!r}: give widths from 1 to 8 separated by commas, e.g. 8,4,2,1") from None
    if not bits or not all(1 <= b <= 8 for b in bits):
        raise UserError(f"{option} {text!r}: every width must be from 1 to 8, e.g. 8,4,2,1")
    return bits
