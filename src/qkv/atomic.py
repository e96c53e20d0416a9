"""Atomic writes: a file appears complete under its name, or not at all.

Data goes to a temporary file in the same directory, is flushed and fsync'd, then renamed over
the target with `os.replace` (atomic on POSIX). A crash mid-write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from qkv.errors import CheckpointError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_replaceable(path: Path, is_kind: Callable[[Path], bool], kind: str) -> None:
    """CheckpointError unless writing a `kind` directory at `path` can only replace one of its kind
    (or an empty directory): a user's other files are never overwritten."""
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"cannot write a {kind} to {path}: it exists and is not a directory")
    if any(path.iterdir()) and not is_kind(path):
        raise CheckpointError(
            f"refusing to replace {path}: it is a non-empty directory that is not a {kind} (choose another path)"
        )


def backup_path(path: Path) -> Path:
    """Where `replace_directory` keeps the previous directory during the swap."""
    return path.with_name(f".{path.name}.previous")


def replace_directory(tmp: Path, path: Path) -> None:
    """Move the complete directory `tmp` to `path`, replacing what is there.

    Two renames (old -> backup, new -> path): an exception between them puts the old directory
    back; a process killed between them leaves the previous one intact at `backup_path(path)`.
    """
    backup = backup_path(path)
    if backup.exists() and path.exists():
        shutil.rmtree(backup)  # an old backup whose clean-up was interrupted
    moved = False
    if path.exists():
        os.rename(path, backup)
        moved = True
    try:
        os.rename(tmp, path)  # the window: until here `path` is absent, the previous one is at `backup`
    except BaseException:
        if moved:
            os.rename(backup, path)
        raise
    fsync_path(path.parent)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success its files are fsync'd and it
    replaces `path` (`replace_directory`), on error it is removed. Temporary directories left by a
    process killed mid-write are cleared first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory the usual permissions
    try:
        yield tmp
        for file in tmp.iterdir():
            fsync_path(file)
        fsync_path(tmp)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
