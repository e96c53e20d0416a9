"""`qkv serve` as a user runs it: it prints its URL, answers, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx

from qkv.cli.main import main


def test_serve_prints_its_url_answers_and_stops_on_ctrl_c(chat_checkpoint):
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkv.cli.main", "serve", f"tiny={chat_checkpoint}", "--port", "0", "--max-batch", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"qkv serve: listening on (http://127\.0\.0\.1:\d+/v1) \(Ctrl-C stops\)\n", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = match.group(1)
        assert [m["id"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]] == ["tiny"]
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
        out = httpx.post(f"{url}/chat/completions", json=body, timeout=30).json()
        assert out["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "tiny (decoder)" in err and err.endswith("qkv serve: stopped\n") and "Traceback" not in err


def test_two_models_under_one_name_are_refused(chat_checkpoint, capsys):
    assert main(["serve", str(chat_checkpoint), f"tiny-chat={chat_checkpoint}"]) == 2
    assert "two models would be served as 'tiny-chat'" in capsys.readouterr().err
