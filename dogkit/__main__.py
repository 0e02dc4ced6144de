"""``python -m dogkit``: the command line, as the ``dogkit`` script runs it."""

from .cli import main

main()
