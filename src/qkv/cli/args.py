"""Argument types shared by subcommands: each rejects a bad value with a message naming the rule."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _checked(cast: Callable[[str], float], ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: `cast` the text, then require `ok(value)`; the message states `rule`."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if cast is int else 'a number'}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value} must be {rule}")
        return value

    parse.__name__ = rule  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, ">= 1")
non_negative_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
probability = _checked(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The MODEL positional every inference subcommand takes."""
    parser.add_argument(
        "model", metavar="MODEL", help="a qkv checkpoint directory, HF directory, .gguf file or known name"
    )
