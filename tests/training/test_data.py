"""Token streams from text files, packing into blocks, the train/val split, resumable batches."""

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from qkv.training.data import (
    BlockLoader,
    causal_lm_batch,
    encode_text,
    iter_blocks,
    load_corpus,
    pack_blocks,
    split_blocks,
    tokenize_files,
)


class ByteTokenizer:
    """The smallest tokenizer: one id per UTF-8 byte."""

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))


@pytest.fixture
def corpus_dir(tmp_path):
    (tmp_path / "b.txt").write_text("bbbb")
    (tmp_path / "a.txt").write_text("aaa")
    (tmp_path / "notes.md").write_text("ignored")
    return tmp_path


def test_files_become_one_stream_in_order_with_eos(corpus_dir):
    tokens = tokenize_files([corpus_dir], ByteTokenizer(), eos_id=0)
    assert tokens.tolist() == [97] * 3 + [0] + [98] * 4 + [0]  # a.txt before b.txt, *.txt only
    assert tokenize_files([corpus_dir / "b.txt"], ByteTokenizer()).tolist() == [98] * 4


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        tokenize_files([tmp_path / "nope.txt"], ByteTokenizer())


def test_encode_text_accepts_a_tokenizers_object():
    hf = HFTokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    assert encode_text(hf, "hello world hi") == [0, 1, 2]


def test_pack_and_split_keep_the_stream_order():
    stream = torch.arange(105)
    assert pack_blocks(stream, 10).tolist() == [list(range(i, i + 10)) for i in range(0, 100, 10)]
    corpus = split_blocks(stream, 10, val_fraction=0.2)
    assert corpus.train.shape == (8, 10) and corpus.val.shape == (2, 10)
    assert corpus.val[0, 0] == 80  # validation is the tail of the stream
    assert split_blocks(stream, 50, val_fraction=0.01).val.shape == (1, 50)  # at least one block
    assert split_blocks(stream, 10, val_fraction=0.0).val.shape == (0, 10)


def test_too_small_corpus_says_what_to_change():
    with pytest.raises(ValueError, match="too few"):
        split_blocks(torch.arange(15), 10, val_fraction=0.1)


def test_load_corpus(corpus_dir):
    corpus = load_corpus([corpus_dir], ByteTokenizer(), seq_len=3, val_fraction=0.3, eos_id=0)
    assert corpus.train.tolist() == [[97, 97, 97], [0, 98, 98]] and corpus.val.tolist() == [[98, 98, 0]]


def test_causal_lm_batch_and_eval_batches():
    blocks = torch.arange(12, dtype=torch.int32).view(6, 2)
    batch = causal_lm_batch(blocks)
    assert batch["input_ids"].dtype == torch.long and torch.equal(batch["input_ids"], batch["labels"])
    assert [len(b) for b in iter_blocks(blocks, 4)] == [4, 2]


def test_each_epoch_is_a_fresh_permutation_of_all_blocks():
    blocks = torch.arange(10).view(10, 1)
    loader = BlockLoader(blocks, batch_size=5, seed=3)
    epochs = [torch.cat([loader.next_batch() for _ in range(2)]).flatten().tolist() for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10))
    assert epochs[0] != epochs[1]
    again = BlockLoader(blocks, batch_size=5, seed=3)
    assert again.next_batch().flatten().tolist() == epochs[0][:5]  # same seed, same batches
    unshuffled = BlockLoader(blocks, batch_size=4, shuffle=False)
    assert [unshuffled.next_batch().flatten().tolist() for _ in range(3)][2] == [0, 1, 2, 3]  # tail skipped


def test_resuming_from_a_saved_position_gives_the_same_batches():
    blocks = torch.arange(14).view(7, 2)
    first = BlockLoader(blocks, batch_size=2, seed=1)
    for _ in range(5):  # into the second epoch
        first.next_batch()
    state = first.state_dict()
    resumed = BlockLoader(blocks, batch_size=2, seed=1)
    resumed.load_state_dict(state)
    for _ in range(7):
        assert torch.equal(first.next_batch(), resumed.next_batch())


def test_resuming_with_other_data_is_refused():
    state = BlockLoader(torch.zeros(8, 4), batch_size=2).state_dict()
    with pytest.raises(ValueError, match="n_blocks=8"):
        BlockLoader(torch.zeros(9, 4), batch_size=2).load_state_dict(state)


def test_batch_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="batch_size=4"):
        BlockLoader(torch.zeros(3, 4), batch_size=4)
