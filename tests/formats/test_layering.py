"""The file-format readers and the tokenizer import no model code (DESIGN.md: dependencies point down).

`import qkv` itself imports everything (the public API in qkv/__init__.py), so the child process
stands in an empty package for `qkv` and imports the modules under test directly: what is then in
sys.modules is exactly what they need.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import importlib.util, json, sys, types
package = types.ModuleType("qkv")
package.__path__ = list(importlib.util.find_spec("qkv").submodule_search_locations)
sys.modules["qkv"] = package  # qkv/__init__.py not run
import qkv.formats.gguf, qkv.formats.jsonfile, qkv.formats.safetensors, qkv.tokenizer, qkv.tokenizer.gguf_vocab
print(json.dumps(sorted(m for m in sys.modules if m.startswith("qkv."))))
"""


def test_formats_and_tokenizer_import_no_models_or_checkpoints():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = json.loads(proc.stdout)
    assert "qkv.tokenizer.gguf_vocab" in imported and "qkv.formats.gguf" in imported
    assert [m for m in imported if m.startswith(("qkv.models", "qkv.checkpoints", "qkv.nn", "qkv.generation"))] == []
