"""`shedshare`: the renter CLI. It speaks only the public HTTP API and never imports Django."""

from marketplace.cli.commands import main

__all__ = ["main"]
