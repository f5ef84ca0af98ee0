"""The ``bbt`` command line: tune, evaluate, report, plot, sweep, methods."""

from bbt_client.cli.commands import main

__all__ = ["main"]
