"""Classification fine-tuning: labelled files, a head on a pre-trained body, a fine-tuned model that
beats the majority and bag-of-words baselines on words it saw only in pre-training, and label names
that survive saving."""

import json
import random

import pytest
import torch

import qkv
from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.models import Encoder
from qkv.tokenizer import train_tokenizer
from qkv.training import (
    BlockLoader,
    LabelledTexts,
    MaskedLMCollator,
    Trainer,
    TrainingConfig,
    classification_batch,
    encode_examples,
    finetune,
    label_names_of,
    pack_blocks,
    predict,
    read_labelled,
    with_classification_head,
    write_labelled,
)
from qkv.training.baselines import BagOfWordsClassifier, majority_accuracy

TOPICS = {
    "colour": ["red", "green", "blue", "pink", "gray", "teal", "cyan", "gold"],
    "animal": ["cat", "dog", "cow", "pig", "owl", "fox", "yak", "emu"],
    "number": ["one", "two", "six", "ten", "four", "five", "nine", "zero"],
    "tree": ["oak", "elm", "ash", "fir", "yew", "bay", "fig", "box"],
}


def topic_texts(n: int, length: tuple[int, int], words: slice, seed: int) -> LabelledTexts:
    """Texts of words drawn from one topic (`words` of its eight), labelled with the topic."""
    rng = random.Random(seed)
    labels = [rng.choice(sorted(TOPICS)) for _ in range(n)]
    texts = [" ".join(rng.choice(TOPICS[y][words]) for _ in range(rng.randint(*length))) for y in labels]
    return LabelledTexts(texts, labels)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(kind="wordpiece", texts=topic_texts(200, (15, 15), slice(None), 9).texts, vocab_size=100,
                           show_progress=False)  # fmt: skip


def tiny_encoder(tokenizer, **overrides) -> Encoder:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-bert", vocab_size=tokenizer.vocab_size, max_seq_len=32, **overrides)
    model = Encoder(cfg)
    model.tokenizer = tokenizer
    return model


@pytest.fixture
def pretrained(tokenizer) -> Encoder:
    """tiny-bert pre-trained as a masked LM on unlabelled text of all 32 words, 15 of a topic per line."""
    lines = topic_texts(400, (15, 15), slice(None), seed=0).texts
    stream = torch.tensor([i for line in lines for i in tokenizer.encode(line, add_special_tokens=False)])
    model = tiny_encoder(tokenizer, head="mlm")
    masker = MaskedLMCollator.from_tokenizer(tokenizer, seed=0)
    config = TrainingConfig(steps=150, lr=3e-3, warmup_steps=10, weight_decay=0.01, progress=False)
    Trainer(model, config, BlockLoader(pack_blocks(stream, 15), 16), collate=masker).train()
    return model


def test_files_round_trip_and_bad_lines_name_themselves(tmp_path):
    data = LabelledTexts(["a\tb", "plain text", "ünïcode"], ["x", "y", "10"])
    for name in ("d.tsv", "d.jsonl"):
        assert read_labelled(write_labelled(tmp_path / name, data)) == data
    assert LabelledTexts(["a", "b", "c"], ["10", "9", "2"]).label_names() == ["2", "9", "10"]
    with pytest.raises(UsageError, match="line break"):
        write_labelled(tmp_path / "e.tsv", LabelledTexts(["two\nlines"], ["x"]))
    (tmp_path / "bad.tsv").write_text("x\tfine\nno tab here\n")
    with pytest.raises(UsageError, match=r"bad.tsv:2: no tab"):
        read_labelled(tmp_path / "bad.tsv")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "t", "label": "x"}) + '\n{"text": "no label"}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: expected an object"):
        read_labelled(tmp_path / "bad.jsonl")
    with pytest.raises(UsageError, match="unknown data format"):
        read_labelled(write_labelled(tmp_path / "d.jsonl", data).rename(tmp_path / "d.csv"))
    with pytest.raises(FileNotFoundError):
        read_labelled(tmp_path / "missing.tsv")


def test_rows_and_batches(tokenizer):
    data = LabelledTexts(["cat red", " ".join(["red"] * 50)], ["one", "other"])
    rows = encode_examples(tokenizer, data, ["one", "other"], max_len=8, pad_id=0)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert rows[:, 0].tolist() == [0, 1] and rows[:, 1].tolist() == [4, 8]
    assert rows[1, 2] == cls and rows[1, 9] == sep  # cut to max_len, the final [SEP] kept
    batch = classification_batch(rows[:1])
    assert batch["input_ids"].shape == (1, 4) and batch["attention_mask"].all() and batch["labels"].tolist() == [0]
    with pytest.raises(UsageError, match=r"label\(s\) 'three'"):
        encode_examples(tokenizer, LabelledTexts(["x"], ["three"]), ["one", "other"], 8)


def test_head_goes_on_the_pretrained_body(tokenizer):
    body = tiny_encoder(tokenizer, head="mlm")
    classifier = with_classification_head(body, ["a", "b", "c"])
    cfg = classifier.config
    assert (cfg.head, cfg.num_labels, cfg.classifier, cfg.extra["labels"]) == ("classification", 3, "dense_gelu",
                                                                                 ["a", "b", "c"])  # fmt: skip
    for name, tensor in body.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(classifier.state_dict()[name], tensor), name
    assert classifier.tokenizer is tokenizer
    assert with_classification_head(tiny_encoder(tokenizer, pooler=True), ["a", "b"]).config.classifier == "pooler"
    assert with_classification_head(classifier, ["a", "b", "c"]) is classifier  # already that classifier


def test_label_count_that_does_not_match_the_head_is_an_error(tokenizer, tmp_path):
    classifier = with_classification_head(tiny_encoder(tokenizer), ["one", "other"])
    with pytest.raises(UsageError, match=r"head has 2 labels \(one, other\) but the data has 3"):
        with_classification_head(classifier, ["one", "other", "third"])
    three = LabelledTexts(["cat", "dog", "red"], ["one", "other", "third"])
    with pytest.raises(UsageError, match=r"the model's 2 labels \(one, other\)"):
        finetune(classifier, three, TrainingConfig(steps=1, progress=False), val_fraction=0, batch_size=2)
    with pytest.raises(UsageError, match="labels must have shape|does not fit"):
        classifier(torch.tensor([[2, 5]]), labels=torch.tensor([2]))
    with pytest.raises(UsageError, match="at least 2 labels"):
        with_classification_head(tiny_encoder(tokenizer), ["only"])
    with pytest.raises(UsageError, match="needs an encoder"):
        with_classification_head(qkv.DecoderLM(ModelConfig.from_name("tiny-gpt2")), ["a", "b"])


def test_finetuning_beats_majority_and_bag_of_words(pretrained, tmp_path):
    # Labelled examples use four words of each topic; held-out ones only the other four, which the
    # bag of words has never seen with a label. The encoder has seen them in pre-training, next to
    # their topic's other words.
    train = topic_texts(400, (4, 8), slice(0, 4), seed=1)
    test = topic_texts(200, (4, 8), slice(4, 8), seed=2)
    config = TrainingConfig(steps=50, lr=1e-3, warmup_steps=5, weight_decay=0.01, out_dir=str(tmp_path / "run"),
                            progress=False)  # fmt: skip
    trainer = finetune(pretrained, train, config, val=test, max_len=16, batch_size=16)

    accuracy = trainer.history[-1]["eval_accuracy"]
    majority = majority_accuracy(train.labels, test.labels)
    bag_of_words = BagOfWordsClassifier().fit(train.texts, train.labels).accuracy(test.texts, test.labels)
    assert accuracy > max(majority, bag_of_words) + 0.2

    loaded = qkv.load(tmp_path / "run" / "checkpoint")  # label names survive saving
    names = sorted(TOPICS)
    assert label_names_of(loaded) == names and loaded.config.extra["labels"] == names
    probs = predict(loaded, test.texts)
    assert probs.shape == (len(test), 4) and torch.allclose(probs.sum(1), torch.ones(len(test)))
    predicted = [names[i] for i in probs.argmax(1).tolist()]
    assert sum(p == y for p, y in zip(predicted, test.labels)) / len(test) > max(majority, bag_of_words) + 0.2
