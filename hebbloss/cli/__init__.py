"""The ``hebbloss`` command line: train, probe and run (see :func:`hebbloss.cli.main.main`)."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
