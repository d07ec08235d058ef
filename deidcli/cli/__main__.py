"""``python -m deidcli.cli``: the same as the ``deid`` command."""

from .main import main

main()
