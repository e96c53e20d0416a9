"""Other decoders behind the server: a GPT-2-style checkpoint (learned positions) and SmolLM2's
real GGUF with its own chat template; greedy replies equal the library's for the same prompt."""

from __future__ import annotations

import openai
import pytest

from conftest import CORPUS, running
from qkv.generation.text import complete
from qkv.tokenizer import CHAT_TEMPLATES
from tiny_checkpoint import save_tiny_checkpoint

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


def chat_equals_the_library(served, n_tokens: int) -> None:
    from qkv.serve.app import create_app

    ids = served.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ref = complete(served.model, served.tokenizer, ids, max_new_tokens=n_tokens)
    with running(create_app({served.name: served})) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(model=served.name, messages=MESSAGES, temperature=0, max_tokens=n_tokens)
        streamed = client.chat.completions.create(
            model=served.name, messages=MESSAGES, temperature=0, max_tokens=n_tokens, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert (out.choices[0].message.content, text) == (ref.text, ref.text) and ref.text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref.token_ids)


def test_a_gpt2_checkpoint(tmp_path):
    from qkv.serve.engine import EngineOptions
    from qkv.serve.models import load_served

    path = save_tiny_checkpoint(tmp_path / "gpt2-chat", CORPUS, 256, CHAT_TEMPLATES["chatml"])
    chat_equals_the_library(load_served(f"gpt2={path}", EngineOptions(max_batch=2)), 12)


@pytest.fixture(scope="module")
def smollm2_path():
    from qkv.hub import pull

    return pull("smollm2-135m-instruct", quiet=True)


@pytest.mark.real
def test_smollm2_dense_with_its_own_chat_template(smollm2_path):
    from qkv.loading import load
    from qkv.serve.engine import EngineOptions
    from qkv.serve.models import served_model

    model = load(smollm2_path, dequantize=True)  # float32, no compiled step: seconds, not minutes
    chat_equals_the_library(served_model("smollm2", model, engine_options=EngineOptions(max_batch=2)), 16)


@pytest.mark.slow
def test_smollm2_packed_q4_1_compiled(smollm2_path):
    """As `qkv serve` runs it by default: packed weights, compiled decode steps (minutes to compile)."""
    from qkv.serve.engine import EngineOptions
    from qkv.serve.models import load_served

    chat_equals_the_library(load_served(str(smollm2_path), EngineOptions(max_batch=2)), 16)
