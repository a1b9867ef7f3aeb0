"""Shedshare node agent: a standalone program that never imports Django."""

__version__ = "0.1.0"
