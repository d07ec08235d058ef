"""The `deid` command line: Click commands only, no pipeline logic (main.py: the group and
`deid anonymize`/`deid models`; doctor.py, demo.py; lazy.py loads the research commands on use)."""

from .main import cli, main

__all__ = ["cli", "main"]
