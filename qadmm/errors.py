"""The one exception type for bad input: its message names the problem and the fix."""


class UserError(ValueError):
    """Bad input from the user (a path, a name, a number out of range). The CLI prints it as one
    line and exits with status 2; everything else is a bug and keeps its traceback."""
