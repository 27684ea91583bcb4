"""The exception types for bad input: each message names the problem and the fix.

The CLI prints any `UserError` as one line and exits with status 2; everything else is a bug. The
subclasses say which boundary refused the input, so a caller can tell them apart:

- `BadFile`: a file that is not what it claims (truncated, corrupted, forged, foreign format);
- `BadData`: a dataset that cannot be used as given (layout, labels, values);
- `BadValue`: a number or name out of range (a hyperparameter, a seed, a NaN);
- `OutputConflict`: an output path that is one of the command's inputs or other outputs.
"""


class UserError(ValueError):
    """Bad input from the user (a path, a name, a number out of range). The CLI prints it as one
    line and exits with status 2; everything else is a bug and keeps its traceback."""


class BadFile(UserError):
    """A file (artifact, packed file, checkpoint, ONNX model) that fails validation on load."""


class BadData(UserError):
    """A dataset whose files or arrays cannot be used as given."""


class BadValue(UserError):
    """A number out of range, NaN or infinite where a finite value is needed."""


class OutputConflict(UserError):
    """An output that would overwrite one of the command's inputs or another of its outputs."""
