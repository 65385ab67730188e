"""CLI sub-commands, one module per command group; each exposes `register(subparsers)`."""

import argparse


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
