"""The `qexport` command line (click): parses and prints; the library does the work."""
from qexport.cli.main import main

__all__ = ["main"]
