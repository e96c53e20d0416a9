"""`qkv chat`: one streamed reply per piped message, `/reset` and `/exit`; no template, a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qkv.generation.text import complete
from qkv.loading import load
from qkv.tokenizer import CHAT_TEMPLATES
from tiny_checkpoint import save_tiny_checkpoint

CORPUS = ["<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nthe quick brown fox<|im_end|>\n"] * 20


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "chatml", CORPUS, 256, CHAT_TEMPLATES["chatml"])


def chat(checkpoint, lines: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qkv.cli.main", "chat", str(checkpoint), "-n", "6"],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=120,
    )


def reply(model, messages) -> str:
    tok = model.tokenizer
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    return complete(model, tok, prompt, add_special_tokens=False, max_new_tokens=6).text


def test_piped_conversation(chatml):
    proc = chat(chatml, ["hello", "/reset", "again", "/exit", "never read"])
    assert proc.returncode == 0, proc.stderr
    model = load(chatml)
    first = reply(model, [{"role": "user", "content": "hello"}])
    # After /reset the history is gone: the second reply is that of a fresh conversation.
    second = reply(model, [{"role": "user", "content": "again"}])
    assert first and second
    assert proc.stdout.split("\n") == [first, second, ""]  # one line per message, none after /exit
    assert "(conversation reset)" in proc.stderr
    assert model.tokenizer.chat_template == CHAT_TEMPLATES["chatml"]


def test_checkpoint_without_a_template(tmp_path):
    proc = chat(save_tiny_checkpoint(tmp_path / "plain", CORPUS, 256), ["hello"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"qkv chat: error: {tmp_path / 'plain'} has no chat template (none in its tokenizer_config.json or GGUF "
        "metadata); add a chat_template there, or use `qkv generate` to continue plain text"
    ]


def test_conversation_outgrowing_the_context_keeps_the_session(tmp_path):
    small = save_tiny_checkpoint(tmp_path / "small", CORPUS, 48, CHAT_TEMPLATES["chatml"])
    proc = chat(small, ["hello " * 30, "/reset", "hi"])
    assert proc.returncode == 0
    assert "message dropped" in proc.stderr and "/reset" in proc.stderr
    assert proc.stdout.count("\n") == 1 and proc.stdout.strip()  # only the message after /reset got a reply
