"""Run the `qkv` command line in-process, for the CLI tests."""

from __future__ import annotations

from qkv.cli.main import main


def qkv(capsys, *argv) -> tuple[int, str, str]:
    """Run `qkv ARGV` in-process -> (exit code, stdout, stderr); argparse's exits included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err
