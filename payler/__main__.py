"""``python -m payler``: the same as the ``payler`` command."""

from payler.cli import main

main()
