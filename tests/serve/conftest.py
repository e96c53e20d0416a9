"""Fixtures for the HTTP server tests: tiny random models (a chat decoder saved and loaded as `qkv
serve` loads it, a BERT-style encoder, a T5-style seq2seq) behind `create_app`, served by uvicorn
in a thread on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from qkv.checkpoints.native import save_native
from qkv.config import ModelConfig
from qkv.models.encoder import Encoder
from qkv.models.seq2seq import EncoderDecoder
from qkv.tokenizer import CHAT_TEMPLATES, train_tokenizer
from tiny_models import tiny_encoder_with_tokenizer, tiny_model

CORPUS = [
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
    "<|im_start|>assistant\nthe quick brown fox jumps over the lazy dog<|im_end|>\n"
] * 20


@contextmanager
def running(app, **config) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def save_chat_checkpoint(path: Path, preset: str = "tiny-llama") -> Path:
    """A tiny random LLaMA-style decoder + byte-level BPE trained on CORPUS, with the ChatML
    template, saved natively (as tests/tiny_checkpoint.py does for GPT-2): single-byte tokens get
    logit 0 from the head, so greedy text is made of whole words."""
    tok = train_tokenizer(kind="bpe", texts=CORPUS, vocab_size=300, show_progress=False)
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    model = tiny_model(preset, vocab_size=tok.vocab_size, max_seq_len=256, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[:257] = 0.0  # <|endoftext|> and the 256 bytes
    model.tokenizer = tok
    save_native(model, path)
    return path


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory) -> Path:
    return save_chat_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="session")
def tiny_encoder() -> Encoder:
    """A random 2-layer BERT with a WordPiece tokenizer trained on a little stdlib source."""
    return tiny_encoder_with_tokenizer()


@pytest.fixture(scope="session")
def tiny_seq2seq() -> EncoderDecoder:
    """A random T5-style encoder-decoder with a byte-level BPE tokenizer (EOS id 1)."""
    tok = train_tokenizer(kind="bpe", texts=CORPUS, vocab_size=320, show_progress=False)
    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig.from_name("tiny-t5", vocab_size=tok.vocab_size)).eval()
    model.tokenizer = tok
    return model


def build_models(chat_checkpoint, tiny_encoder, tiny_seq2seq, **engine) -> dict:
    from qkv.serve.engine import EngineOptions
    from qkv.serve.models import load_served, served_model

    chat = load_served(f"chat={chat_checkpoint}", EngineOptions(**{"max_batch": 4, "max_queue": 64, **engine}))
    return {
        "chat": chat,
        "bert": served_model("bert", tiny_encoder),
        "t5": served_model("t5", tiny_seq2seq),
    }


@pytest.fixture(scope="session")
def models(chat_checkpoint, tiny_encoder, tiny_seq2seq) -> dict:
    return build_models(chat_checkpoint, tiny_encoder, tiny_seq2seq)


@pytest.fixture(scope="session")
def server(models) -> Iterator[str]:
    """The base URL of a server over the three tiny models (no API key)."""
    from qkv.serve.app import ServeOptions, create_app

    with running(create_app(models, ServeOptions(max_tokens_cap=200, max_body_bytes=64 * 1024))) as url:
        yield url
