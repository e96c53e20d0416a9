"""Entry point of the `qkv` command.

Each subcommand lives in its own module ``qkv.cli.<name>`` exposing ``register(subparsers)``,
which adds its parser and sets ``func`` to a callable taking the parsed namespace and returning an
exit code. Bad arguments exit with code 2 and a one-line message, as argparse does.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("train", "generate", "attention", "tokenizer", "models", "pull", "convert", "chat")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(prog="qkv", description="Transformer models: train, load, generate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"qkv.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"qkv.cli.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `qkv` command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"qkv {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
