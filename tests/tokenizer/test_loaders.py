"""load_tokenizer: each file format, detected by what the path holds, gives the reference's ids."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
from transformers import AutoTokenizer, GPT2Tokenizer

from qkv.errors import TokenizerError
from qkv.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir):
    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="module")
def minilm_vocab_only(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2's vocab.txt and tokenizer_config.json, without its tokenizer.json."""
    directory = tmp_path_factory.mktemp("minilm_vocab")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, directory / name)
    return directory


@pytest.mark.real
@pytest.mark.parametrize("source", ["known name", "tokenizer.json", "vocab.txt"])
def test_minilm_ids_equal_transformers(source, minilm_dir, minilm_vocab_only, minilm_reference, short_corpus):
    paths = {
        "known name": "all-minilm-l6-v2",
        "tokenizer.json": minilm_dir,
        "vocab.txt": minilm_vocab_only / "vocab.txt",
    }
    tok = load_tokenizer(paths[source])
    assert tok.source_format == ("vocab.txt" if source == "vocab.txt" else "tokenizer.json")
    texts = short_corpus
    assert tok.encode_batch(texts) == minilm_reference(texts)["input_ids"]
    assert (
        tok.encode_batch(texts, add_special_tokens=False)
        == minilm_reference(texts, add_special_tokens=False)["input_ids"]
    )
    for role in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token"):
        assert tok.special_tokens[role] == getattr(minilm_reference, role)


@pytest.mark.real
def test_minilm_vocab_txt_honours_do_lower_case(minilm_vocab_only, tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_vocab_only / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"do_lower_case": False}))
    cased = load_tokenizer(tmp_path)
    uncased = load_tokenizer(minilm_vocab_only)
    assert cased.encode("Hello") != uncased.encode("Hello")
    assert cased.encode("hello") == uncased.encode("hello")
    (tmp_path / "tokenizer_config.json").unlink()  # without a config, BERT lowercases
    assert load_tokenizer(tmp_path).encode("Hello World") == uncased.encode("hello world")


@pytest.fixture(scope="module")
def gpt2_files(trained_bpe, tmp_path_factory):
    """GPT-2's vocab.json + merges.txt of a trained byte-level BPE, written by `tokenizers`."""
    directory = tmp_path_factory.mktemp("gpt2_files")
    trained_bpe.engine.model.save(str(directory))
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_gpt2_vocab_merges_ids_equal_source_and_transformers(gpt2_files, trained_bpe, short_corpus):
    tok = load_tokenizer(gpt2_files)
    assert tok.source_format == "vocab.json+merges.txt"
    reference = GPT2Tokenizer(vocab=str(gpt2_files / "vocab.json"), merges=str(gpt2_files / "merges.txt"))
    texts = short_corpus
    ids = tok.encode_batch(texts)
    assert ids == trained_bpe.encode_batch(texts)
    assert ids == reference(texts, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id == trained_bpe.eos_token_id == reference.eos_token_id
    assert tok.encode("a<|endoftext|>b") == reference.encode("a<|endoftext|>b")


@pytest.mark.parametrize("entry", ["vocab.json", "merges.txt"])
def test_gpt2_pair_from_either_file(entry, gpt2_files, trained_bpe, tricky_texts):
    tok = load_tokenizer(gpt2_files / entry)
    assert tok.source_format == "vocab.json+merges.txt"
    assert tok.encode_batch(tricky_texts) == trained_bpe.encode_batch(tricky_texts)


def test_directory_prefers_tokenizer_json(gpt2_files, trained_bpe, tmp_path):
    shutil.copytree(gpt2_files, tmp_path, dirs_exist_ok=True)
    trained_bpe.save(tmp_path)
    assert load_tokenizer(tmp_path).source_format == "tokenizer.json"


def test_directory_with_one_rank_file(tmp_path):
    lines = (f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    (tmp_path / "cl100k_base.tiktoken").write_text("".join(lines))
    tok = load_tokenizer(tmp_path)
    assert tok.source_format == "tiktoken"
    assert tok.encode("hi") == [ord("h"), ord("i")]


def test_missing_path_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="neither an existing path nor a known model name"):
        load_tokenizer(tmp_path / "nothing-here")


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="cannot tell what kind"):
        load_tokenizer(tmp_path / "README.md")


def test_several_candidate_files(cl100k_path, tmp_path):
    for name in ("cl100k_base.tiktoken", "o200k_base.tiktoken"):
        (tmp_path / name).write_text("x")
    with pytest.raises(TokenizerError, match="several"):
        load_tokenizer(tmp_path)


def test_gpt2_pair_needs_both_files(gpt2_files, tmp_path):
    shutil.copy(gpt2_files / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(TokenizerError, match="needs both vocab.json and merges.txt"):
        load_tokenizer(tmp_path / "vocab.json")


def _break(path, how: str) -> None:
    text = path.read_text(encoding="utf-8")
    if how == "empty":
        path.write_text("")
    elif how == "truncated":
        path.write_text(text[: len(text) // 2])
    elif how == "not-utf8":
        path.write_bytes(b"\xff\xfe" + text.encode()[:100])


@pytest.mark.parametrize(
    ("file", "how", "message"),
    [
        ("tokenizer.json", "empty", "is empty"),
        ("tokenizer.json", "truncated", "not valid JSON.*truncated"),
        ("tokenizer.json", "not-utf8", "not UTF-8"),
        ("vocab.json", "truncated", "not valid JSON"),
        ("merges.txt", "empty", "is empty"),
        ("tokenizer_config.json", "truncated", "not valid JSON"),
    ],
)
def test_broken_files_name_the_file(file, how, message, gpt2_files, trained_bpe, tmp_path):
    shutil.copytree(gpt2_files, tmp_path, dirs_exist_ok=True)
    if file == "tokenizer.json":
        trained_bpe.save(tmp_path)
    _break(tmp_path / file, how)
    with pytest.raises(TokenizerError, match=message) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / file) in str(info.value)


def test_tokenizer_json_that_is_not_a_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="not valid tokenizer.json|expected a JSON object"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("merges", "message"),
    [
        ("#version: 0.2\nĠ t\nlonely\n", "line 3: expected 'left right'"),
        ("#version: 0.2\nĠ t\nq9 zz\n", "line 3: 'q9' is not in the vocabulary"),
    ],
)
def test_malformed_merges(merges, message, gpt2_files, tmp_path):
    shutil.copy(gpt2_files / "vocab.json", tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text(merges)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("vocab", "message"),
    [("[PAD]\n[UNK]\n\n[CLS]\n", "line 3 is empty"), ("[UNK]\n[CLS]\n[SEP]\n[CLS]\n", "already appears on line 2")],
)
def test_malformed_vocab_txt(vocab, message, tmp_path):
    (tmp_path / "vocab.txt").write_text(vocab)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(tmp_path)


def test_vocab_txt_without_unknown_token(tmp_path):
    (tmp_path / "vocab.txt").write_text("[CLS]\n[SEP]\nhello\n")
    with pytest.raises(TokenizerError, match=r"has no unk_token '\[UNK\]'"):
        load_tokenizer(tmp_path)


def test_config_roles_and_chat_template(trained_bpe, tmp_path):
    trained_bpe.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = load_tokenizer(tmp_path)
    assert tok.bos_token_id == tok.eos_token_id == trained_bpe.token_to_id("<|endoftext|>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_vocab_txt_with_extra_special_tokens(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"additional_special_tokens": ["<new>"]}))
    tok = load_tokenizer(tmp_path)
    assert tok.token_to_id("<new>") == 7  # appended after the vocabulary, as transformers does
    assert tok.encode("hello <new> world") == [2, 5, 7, 6, 3]
    assert tok.encode("hello <new> world", allowed_special=()) != [2, 5, 7, 6, 3]


def test_config_role_missing_from_vocabulary_is_ignored_with_a_warning(trained_bpe, tmp_path):
    trained_bpe.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"pad_token": "<pad>"}))
    with pytest.warns(UserWarning, match="pad_token '<pad>' from the config is not in the vocabulary"):
        tok = load_tokenizer(tmp_path)
    assert tok.pad_token_id is None and tok.eos_token_id == trained_bpe.eos_token_id
