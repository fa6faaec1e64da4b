"""``python -m weft.cli``: the same as the ``weft`` script, without installing it."""

from weft.cli import main

main()
