"""Training: what qkv trains saves as a tokenizer.json that transformers reads and encodes identically."""

from __future__ import annotations

import pytest
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from qkv.errors import TokenizerError
from qkv.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


@pytest.fixture(params=["bpe", "wordpiece"])
def trained(request, trained_bpe, trained_wordpiece) -> Tokenizer:
    return {"bpe": trained_bpe, "wordpiece": trained_wordpiece}[request.param]


def test_round_trip_through_transformers(trained, short_corpus, tmp_path):
    trained.save(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    engine = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = short_corpus
    ids = trained.encode_batch(texts)
    assert reloaded.encode_batch(texts) == ids
    assert [e.ids for e in engine.encode_batch(texts)] == ids
    assert fast(texts)["input_ids"] == ids
    assert auto(texts)["input_ids"] == ids
    assert reloaded.special_tokens == trained.special_tokens
    for role, token in trained.special_tokens.items():
        assert getattr(auto, role) == token


def test_byte_level_bpe_never_meets_an_unknown_byte(trained_bpe, tricky_texts):
    assert trained_bpe.vocab_size == 1000
    assert trained_bpe.decode_batch(trained_bpe.encode_batch(tricky_texts)) == tricky_texts


def test_wordpiece_is_bert_shaped(trained_wordpiece):
    tok = trained_wordpiece
    roles = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert [tok.token_to_id(t) for t in roles] == [0, 1, 2, 3, 4]
    enc = tok.encode_with_offsets("Return Values")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert "return" in enc.tokens  # lowercased
    assert any(t.startswith("##") for t in tok.encode_with_offsets("Tokenizerization").tokens)
    assert tok.decode(tok.encode("return values"), skip_special_tokens=True) == "return values"


def test_wordpiece_options():
    texts = ["Café Über naïve Résumé"] * 30
    cased = train_tokenizer(kind="wordpiece", texts=texts, vocab_size=200, lowercase=False, show_progress=False)
    assert "Café" in cased.encode_with_offsets("Café").tokens
    stripped = train_tokenizer(kind="wordpiece", texts=texts, vocab_size=200, show_progress=False)
    assert "cafe" in stripped.encode_with_offsets("Café").tokens


def test_files_and_texts_train_the_same(small_corpus, tmp_path):
    paths = []
    for i, text in enumerate(small_corpus[:10]):
        paths.append(tmp_path / f"part{i}.txt")
        paths[-1].write_text(text)
    from_files = train_tokenizer(files=paths, vocab_size=400, show_progress=False)
    # The engine reads files line by line, so the same lines are fed as texts.
    lines = (line for text in small_corpus[:10] for line in text.splitlines(keepends=True))
    from_texts = train_tokenizer(texts=lines, vocab_size=400, show_progress=False)
    assert from_files.engine.get_vocab() == from_texts.engine.get_vocab()


def test_special_tokens_and_roles():
    tok = train_tokenizer(texts=["a b c"] * 5, vocab_size=300, special_tokens=["<eos>", "<pad>"], show_progress=False)
    assert tok.token_to_id("<eos>") == 0 and tok.eos_token_id == 0 == tok.bos_token_id
    assert tok.encode("x<pad>y") == [tok.token_to_id("x"), 1, tok.token_to_id("y")]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"texts": ["a"], "vocab_size": 100}, ValueError, "too small for byte-level BPE"),
        ({"texts": ["a"], "vocab_size": 5, "kind": "wordpiece"}, ValueError, "must exceed the 5 special tokens"),
        ({"texts": ["a"], "vocab_size": 300, "kind": "unigram"}, ValueError, "kind must be"),
        ({"vocab_size": 300}, ValueError, "exactly one of files= .* or texts="),
        ({"texts": "one string", "vocab_size": 300}, ValueError, "not one string"),
        ({"files": [], "vocab_size": 300}, ValueError, "files= is empty"),
        ({"files": ["/nonexistent/corpus.txt"], "vocab_size": 300}, TokenizerError, "corpus.txt does not exist"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        train_tokenizer(show_progress=False, **kwargs)


def test_failed_save_leaves_previous_files_intact(trained_bpe, tmp_path, monkeypatch):
    trained_bpe.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = train_tokenizer(texts=["completely different text"] * 10, vocab_size=270, show_progress=False)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", fail)  # the disk fills up while the new file is being written
    with pytest.raises(OSError, match="No space left"):
        other.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left behind


def test_save_to_a_json_path(trained_bpe, tmp_path):
    path = trained_bpe.save(tmp_path / "mine.json")
    assert path == tmp_path / "mine.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json"]
    assert load_tokenizer(path).encode("x = 1") == trained_bpe.encode("x = 1")
