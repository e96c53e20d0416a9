"""`python -m qkv` is the `qkv` command (what `torchrun ... -m qkv train ...` runs)."""

from __future__ import annotations

import subprocess
import sys


def test_python_dash_m_qkv_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "qkv", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: qkv train" in done.stdout and "--nproc" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "qkv", "no-such-command"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no-such-command" in bad.stderr
