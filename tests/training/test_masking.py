"""Masked-LM batches: BERT's 15% and 80/10/10 within sampling error, special tokens and padding
never chosen, whole words kept whole, reproducible masks, and a model that learns from them."""

import math
import random

import pytest
import torch

from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.models import Encoder
from qkv.tokenizer import train_tokenizer
from qkv.training import BlockLoader, MaskedLMCollator, Trainer, TrainingConfig, masked_token_accuracy, split_blocks
from qkv.training.baselines import unigram_accuracy
from qkv.training.masking import IGNORE_INDEX, continuation_table

VOCAB, PAD, CLS, SEP, MASK = 1000, 0, 2, 3, 4
SPECIAL = (PAD, 1, CLS, SEP, MASK)


def within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """`count` successes of `n` trials agree with probability `p` (binomial, `sigmas` standard deviations)."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.fixture
def padded_blocks():
    """[64, 512] ids over the whole vocabulary, special ids sprinkled in, rows right-padded to random lengths."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (64, 512), generator=g)
    lengths = torch.randint(300, 513, (64,), generator=g)
    ids[torch.arange(512) >= lengths[:, None]] = PAD
    return ids


def test_choice_and_corruption_rates_match_bert(padded_blocks):
    masker = MaskedLMCollator(VOCAB, MASK, SPECIAL, PAD, cls_id=None, seed=0)
    batch = masker(padded_blocks)
    original = padded_blocks
    candidate = ~torch.isin(original, torch.tensor(SPECIAL))
    chosen = batch["labels"] != IGNORE_INDEX

    assert not (chosen & ~candidate).any()  # special tokens and padding are never chosen
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])  # nothing else is touched
    assert torch.equal(batch["attention_mask"], (original != PAD).long())
    assert within(int(chosen.sum()), int(candidate.sum()), 0.15)

    inputs = batch["input_ids"][chosen]
    n = int(chosen.sum())
    n_replacements = VOCAB - len(SPECIAL)  # a random replacement equals the original 1 time in n_replacements
    masked, kept = int((inputs == MASK).sum()), int((inputs == original[chosen]).sum())
    assert within(masked, n, 0.8)
    assert within(kept, n, 0.1 + 0.1 / n_replacements)
    assert within(n - masked - kept, n, 0.1 * (1 - 1 / n_replacements))
    assert not torch.isin(
        inputs[(inputs != MASK)], torch.tensor([PAD, 1, CLS, SEP])
    ).any()  # random ids are not special


def test_whole_word_masking_keeps_words_whole(padded_blocks):
    continuation = torch.zeros(VOCAB, dtype=torch.bool)
    continuation[600:] = True  # ids >= 600 play "##" pieces: ~40% of the tokens continue the word before
    masker = MaskedLMCollator(VOCAB, MASK, SPECIAL, PAD, whole_word=True, continuation=continuation, cls_id=None)
    ids = padded_blocks
    chosen = masker(ids)["labels"] != IGNORE_INDEX
    candidate = ~torch.isin(ids, torch.tensor(SPECIAL))
    # Words as the collator must see them: a word starts at every token that is not a "##" piece.
    word = (~continuation[ids] | ~candidate).long().cumsum(1) + torch.arange(len(ids))[:, None] * (ids.shape[1] + 1)
    word, flags = word[candidate], chosen[candidate].long()
    n_groups = int(word.max()) + 1
    lowest = torch.full((n_groups,), 2).scatter_reduce(0, word, flags, "amin")
    highest = torch.full((n_groups,), -1).scatter_reduce(0, word, flags, "amax")
    present = highest >= 0
    assert torch.equal(lowest[present], highest[present]), "a word was split"
    assert not (chosen & ~candidate).any()
    assert within(int(highest[present].sum()), int(present.sum()), 0.15)


def test_whole_word_with_a_wordpiece_tokenizer():
    tok = train_tokenizer(kind="wordpiece", texts=["unbelievable interpretation of antidisestablishment"] * 3,
                          vocab_size=60, show_progress=False)  # fmt: skip
    masker = MaskedLMCollator.from_tokenizer(tok, whole_word=True, mask_prob=0.5, seed=1)
    ids = torch.tensor([tok.encode("unbelievable interpretation " * 20, add_special_tokens=False)])
    table = continuation_table(tok)
    assert {tok.id_to_token(i).startswith("##") for i in ids[0].tolist()} == {True, False}
    chosen = masker(ids)["labels"][0, 1:] != IGNORE_INDEX  # position 0 is the [CLS] put in front
    word = (~table[ids[0]]).long().cumsum(0)
    for w in word.unique():
        assert chosen[word == w].all() or not chosen[word == w].any()
    assert 0 < int(chosen.sum()) < len(chosen)


def test_reproducible_resumable_and_fixed_for_evaluation(padded_blocks):
    blocks = padded_blocks[:8]
    a, b = MaskedLMCollator(VOCAB, MASK, SPECIAL, PAD, seed=3), MaskedLMCollator(VOCAB, MASK, SPECIAL, PAD, seed=3)
    assert torch.equal(a(blocks)["input_ids"], b(blocks)["input_ids"])
    state = a.state_dict()
    expected = a(blocks)["input_ids"]
    c = MaskedLMCollator(VOCAB, MASK, SPECIAL, PAD, seed=99)
    c.load_state_dict(state)
    assert torch.equal(c(blocks)["input_ids"], expected)  # a restored state continues the same sequence
    assert not torch.equal(a(blocks)["input_ids"], expected)  # ... and successive calls differ

    fixed = a.fixed()
    first = fixed(blocks)["input_ids"]
    fixed(padded_blocks[8:16])
    assert torch.equal(fixed(blocks)["input_ids"], first)  # same content, same masks, whatever came between
    assert batch_labels_differ(fixed(padded_blocks[8:16]), fixed(padded_blocks[16:24]))


def batch_labels_differ(x: dict, y: dict) -> bool:
    return not torch.equal(x["labels"] != IGNORE_INDEX, y["labels"] != IGNORE_INDEX)


def test_cls_goes_in_front_and_is_never_chosen():
    masker = MaskedLMCollator(VOCAB, MASK, SPECIAL, PAD, cls_id=CLS, mask_prob=0.9)
    batch = masker(torch.randint(5, VOCAB, (4, 10)))
    assert batch["input_ids"].shape == (4, 11) and (batch["input_ids"][:, 0] == CLS).all()
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()


def test_bad_input_is_a_clear_error():
    bpe = train_tokenizer(kind="bpe", texts=["hello world"] * 5, vocab_size=270, show_progress=False)
    with pytest.raises(UsageError, match="no mask token"):
        MaskedLMCollator.from_tokenizer(bpe)
    with pytest.raises(UsageError, match="mask_prob"):
        MaskedLMCollator(VOCAB, MASK, SPECIAL, mask_prob=1.0)
    with pytest.raises(UsageError, match="sum to"):
        MaskedLMCollator(VOCAB, MASK, SPECIAL, mask_fraction=0.8, random_fraction=0.3)
    with pytest.raises(UsageError, match="vocab_size"):
        MaskedLMCollator(VOCAB, MASK, SPECIAL)(torch.tensor([[5, VOCAB]]))


# -- learning -----------------------------------------------------------------------------------
WORDS = ["red", "green", "blue", "pink", "cat", "dog", "cow", "pig", "one", "two", "six", "ten",
         "oak", "elm", "ash", "fir", "bee", "ant", "owl", "fox", "yak", "emu", "eel", "koi"]  # fmt: skip


def repeated_word_corpus(n_lines: int = 400, length: int = 15, seed: int = 0) -> list[str]:
    """Lines of one word said `length` times: a masked word is given away by its neighbours."""
    rng = random.Random(seed)
    return [" ".join([rng.choice(WORDS)] * length) for _ in range(n_lines)]


def test_mlm_loss_falls_and_beats_the_unigram_baseline():
    lines = repeated_word_corpus()
    tok = train_tokenizer(kind="wordpiece", texts=lines, vocab_size=120, show_progress=False)
    stream = torch.tensor([i for line in lines for i in tok.encode(line, add_special_tokens=False)])
    corpus = split_blocks(stream, 15, val_fraction=0.25)
    torch.manual_seed(0)
    model = Encoder(ModelConfig.from_name("tiny-bert", vocab_size=tok.vocab_size, head="mlm", max_seq_len=32))
    masker = MaskedLMCollator.from_tokenizer(tok, seed=0)
    config = TrainingConfig(steps=80, lr=3e-3, warmup_steps=10, weight_decay=0.01, progress=False)
    trainer = Trainer(model, config, BlockLoader(corpus.train, 16), corpus.val, masker,
                      eval_collate=masker.fixed(), accuracy=masked_token_accuracy)  # fmt: skip
    records = trainer.train()

    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[0] > math.log(len(WORDS))  # ~ln(vocab) at the start
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]
    special = [tok.token_to_id(t) for t in tok.all_special_tokens]
    baseline = unigram_accuracy(corpus.train, masker.fixed()(corpus.val)["labels"], special)
    assert baseline < 0.15  # one of 24 words, roughly
    assert records[-1]["eval_accuracy"] > baseline + 0.3


def test_an_mlm_run_resumes_with_the_same_masks(tmp_path):
    # The collator's generator is part of the checkpoint: a resumed run masks exactly as the original.
    blocks = torch.randint(5, 60, (24, 15), generator=torch.Generator().manual_seed(0))

    def trainer(out, resume=False):
        masker = MaskedLMCollator(60, MASK, SPECIAL, PAD, cls_id=CLS, seed=0)
        options = {"eval_collate": masker.fixed(), "accuracy": masked_token_accuracy}
        if resume:
            torch.manual_seed(1234)  # a new process starts from other RNG states
            return Trainer.from_checkpoint(
                out / "checkpoint", BlockLoader(blocks[:20], 4), blocks[20:], masker, **options
            )
        torch.manual_seed(0)
        model = Encoder(ModelConfig.from_name("tiny-bert", vocab_size=60, head="mlm", max_seq_len=32, dropout=0.1))
        config = TrainingConfig(steps=6, lr=3e-3, eval_every=3, save_every=3, out_dir=str(out), progress=False)
        return Trainer(model, config, BlockLoader(blocks[:20], 4), blocks[20:], masker, **options)

    expected = trainer(tmp_path / "a").train()
    first = trainer(tmp_path / "b")
    first.train(until=4)  # checkpoint at step 3 (after its evaluation), then "killed" in step 4
    resumed = trainer(tmp_path / "b", resume=True)
    resumed.train()
    values = lambda records: [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("eval_accuracy")) for r in records]  # noqa: E731
    assert values(first.history[:4] + resumed.history) == values(expected)
