"""``python -m copystream``: the command line."""

from .cli import main

main()
