"""`qkv chat`: one streamed reply per piped message, `/reset` and `/exit`; no template, a clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qkv import DecoderLM, ModelConfig
from qkv.checkpoints.native import save_native
from qkv.generation.text import complete
from qkv.load import load
from qkv.tokenizer import CHAT_TEMPLATES, train_tokenizer

CORPUS = ["<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nthe quick brown fox<|im_end|>\n"] * 20


def save_checkpoint(path, chat_template: str | None):
    """A tiny random DecoderLM + trained BPE, saved natively; the template goes into the
    tokenizer_config.json next to tokenizer.json, where loaders look for it. Single-byte tokens
    get logit 0, so replies are multi-character tokens and never hold a newline."""
    tok = train_tokenizer(kind="bpe", texts=CORPUS, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-gpt2", vocab_size=tok.vocab_size, max_seq_len=256, tie_embeddings=False)
    model = DecoderLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[:257] = 0.0  # <|endoftext|> and the 256 bytes
    model.tokenizer = tok
    save_native(model, path)
    if chat_template is not None:
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return path


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("chat") / "chatml", CHAT_TEMPLATES["chatml"])


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
    proc = chat(save_checkpoint(tmp_path / "plain", None), ["hello"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"qkv chat: error: {tmp_path / 'plain'} has no chat template (none in its tokenizer_config.json or GGUF "
        "metadata); add a chat_template there, or use `qkv generate` to continue plain text"
    ]
