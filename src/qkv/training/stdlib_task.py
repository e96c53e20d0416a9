"""A labelled task made from the Python standard library on disk: which package does this function
come from? (e.g. `asyncio`, `email`, `xml`).

Every function and method (`def`, `async def`, nested ones too) of a package's modules is an
example: its source, dedented and cut to `max_chars` characters, labelled with the package. The
held-out split takes whole files, so no source file gives examples to both splits, and a text
that also occurs in the training split is dropped from it. Everything is deterministic: files
are visited in sorted order, assigned by a hash of their path, and subsampled with a seeded RNG.
"""

from __future__ import annotations

import ast
import random
import sysconfig
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

from qkv.training.classification import LabelledTexts

PACKAGES = ("asyncio", "email", "importlib", "multiprocessing", "tkinter", "unittest", "urllib", "xml")


@dataclass
class TaskSplit:
    """Training and held-out examples, and the files (relative to the stdlib) each came from."""

    train: LabelledTexts
    test: LabelledTexts
    train_files: list[str]
    test_files: list[str]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def package_files(package: str, root: Path | None = None) -> list[Path]:
    """The package's modules, sorted, without its own test suites (`test`, `tests`, `idle_test` folders)."""
    root = root or stdlib_root()
    if not (root / package / "__init__.py").is_file():
        raise FileNotFoundError(f"{root / package} is not a standard-library package on this Python")
    return sorted(
        f for f in (root / package).rglob("*.py") if not any("test" in part for part in f.relative_to(root).parts[1:-1])
    )


def functions_of(path: Path, max_chars: int) -> list[str]:
    """The source of every function in a file, dedented and cut to `max_chars` (unparsable files: none)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines(keepends=True)  # (ast.get_source_segment splits the file on every call)
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # Whole lines: the def line is indented by col_offset, which dedent then removes.
            segment = "".join(lines[node.lineno - 1 : node.end_lineno])
            texts.append(textwrap.dedent(segment).strip("\n")[:max_chars])
    return texts


def split_files(files: list[Path], counts: dict[Path, int], test_share: float, root: Path) -> set[Path]:
    """The held-out files of one package: visited in hash order, each taken while the held-out share
    of the package's functions stays under 1.5 × `test_share`, until it reaches `test_share`."""
    total = sum(counts.values())
    held, taken = set(), 0
    for f in sorted(files, key=lambda f: zlib.crc32(str(f.relative_to(root)).encode())):
        if taken >= test_share * total:
            break
        if counts[f] and taken + counts[f] <= 1.5 * test_share * total:
            held.add(f)
            taken += counts[f]
    if not held:  # every file is too big: hold out the smallest one that has functions
        held.add(min((f for f in files if counts[f]), key=lambda f: counts[f]))
    return held


def package_task(
    packages: tuple[str, ...] = PACKAGES,
    *,
    max_chars: int = 400,
    test_share: float = 0.2,
    train_per_class: int | None = 300,
    test_per_class: int | None = 100,
    seed: int = 0,
    root: Path | None = None,
) -> TaskSplit:
    """The "which package?" task over `packages`, split by file, at most `*_per_class` examples per label."""
    root = root or stdlib_root()
    rng = random.Random(seed)
    train_texts, train_labels, test_texts, test_labels = [], [], [], []
    train_files, test_files = [], []
    for package in packages:
        files = package_files(package, root)
        texts = {f: functions_of(f, max_chars) for f in files}
        held = split_files(files, {f: len(t) for f, t in texts.items()}, test_share, root)
        train = [t for f in files if f not in held for t in texts[f]]
        seen = set(train)
        test = [t for f in files if f in held for t in texts[f] if t not in seen]
        for pool, cap, out_texts, out_labels in ((train, train_per_class, train_texts, train_labels),
                                                  (test, test_per_class, test_texts, test_labels)):  # fmt: skip
            pool = list(dict.fromkeys(pool))  # exact duplicates (one-line stubs) once
            if cap is not None and len(pool) > cap:
                pool = rng.sample(pool, cap)
            out_texts.extend(pool)
            out_labels.extend([package] * len(pool))
        train_files += [str(f.relative_to(root)) for f in files if f not in held]
        test_files += [str(f.relative_to(root)) for f in files if f in held]
    return TaskSplit(LabelledTexts(train_texts, train_labels), LabelledTexts(test_texts, test_labels),
                     train_files, test_files)  # fmt: skip
