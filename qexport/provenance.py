"""What produced a file, recorded in one place: every card (an artifact's metadata, a float
checkpoint's card, a sweep's results line) takes its provenance from here.

`Provenance` is what a caller knows and the library cannot: the model's name, how the float model
was trained, and the command line (the CLI passes its own; the library never reads `sys.argv`).
`stamp` adds the package versions and that command to a card. `is_user_model` is the one rule for
"the user's own model" (a `module:factory` or `file.py:factory`, not a zoo name).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from qexport.fileio import versions

API = "python API"  # the command of a file made from Python


@dataclass(frozen=True)
class Provenance:
    model_name: str | None = None  # default: the model's class name
    float_training: dict[str, Any] = field(default_factory=dict)  # how the float model was made (checkpoint, epochs, ...)
    command: str = API


def command_line(argv: Sequence[str]) -> str:
    """The CLI's command as a card records it."""
    return "qexport " + " ".join(argv)


def stamp(card: dict[str, Any], command: str = API) -> dict[str, Any]:
    """`card` with the versions that made it and the command."""
    return {**card, "versions": versions(), "command": command}


def is_user_model(name: str | None) -> bool:
    """Whether `--model NAME` names the user's own factory (module:factory or path/to/file.py:factory)
    rather than one of qexport's zoo models."""
    from qadmm.zoo import NAMES

    return bool(name) and name not in NAMES and ":" in name


def float_card(arch: dict[str, Any], preprocessing: dict[str, Any], dataset: dict[str, Any] | None, training: dict[str, Any],
               command: str = API) -> dict[str, Any]:
    """The card of a float checkpoint (`qexport train`, a sweep's float model)."""
    return stamp({"architecture": arch, "preprocessing": preprocessing, **({"dataset": dataset} if dataset else {}),
                  "training": training}, command)
