"""``python -m copystream``: the command line."""

from .cli import run

run()
