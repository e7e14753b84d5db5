"""The `mirador` command line: one module per command group; `main` is the console script."""

from node.cli.main import main

__all__ = ["main"]
