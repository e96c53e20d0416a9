"""Entry point of the `qkv` command.

Each subcommand lives in its own module ``qkv.cli.<name>`` exposing ``register(subparsers)``,
which adds its parser and sets ``func`` to a callable taking the parsed namespace and returning an
exit code.

Exit codes, each failure reported as one line ``qkv COMMAND: error: ...`` on stderr:

- 2: the user's input is wrong: bad arguments (argparse), a `QkvError` (a bad or hostile model or
  tokenizer file, an unusable option: the message names the file or flag and the fix), a file that
  is missing or not readable, input nested too deeply to parse;
- 1: the machine failed, not the input: another `OSError` (disk full, I/O error), out of memory;
- 130: interrupted.

Any other exception, a plain ValueError included, propagates with its traceback: qkv reports bad
input with a `QkvError`, so anything else is a bug (or a message that should become a `QkvError`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qkv.errors import QkvError

SUBCOMMANDS = (
    "train",
    "generate",
    "attention",
    "tokenizer",
    "models",
    "pull",
    "convert",
    "chat",
    "embed",
    "similarity",
    "search",
    "finetune",
    "classify",
    "zero-shot",
    "bench",
    "serve",
    "lora",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(prog="qkv", description="Transformer models: train, load, generate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"qkv.cli.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name == f"qkv.cli.{name.replace('-', '_')}":
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
    except QkvError as exc:
        return _report(args, str(exc), 2)
    except RecursionError:
        return _report(args, "the input is nested too deeply to process (a corrupt or hostile file?)", 2)
    except OSError as exc:
        return _report(args, _describe(exc), 2 if isinstance(exc, _INPUT_OS_ERRORS) else 1)
    except MemoryError:
        return _report(args, "out of memory; try a smaller model, --dtype bfloat16 or a shorter input", 1)


# OSErrors that mean a path the user gave is wrong; any other (ENOSPC, EIO, ...) is the machine's.
_INPUT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _describe(exc: OSError) -> str:
    """An OSError as 'what went wrong: the file(s)', the way the shell says it."""
    if exc.strerror is None:  # raised with a message of its own
        return str(exc)
    files = ", ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{exc.strerror}: {files}" if files else exc.strerror


def _report(args: argparse.Namespace, message: str, code: int) -> int:
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"qkv {args.command}: error: {one_line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
