"""Baselines: majority class, most frequent token, and bag-of-words logistic regression."""

import random

import pytest
import torch

from qkv.errors import UsageError
from qkv.training.baselines import BagOfWordsClassifier, fit_logistic, majority_accuracy, unigram_accuracy


def test_majority_and_unigram():
    assert majority_accuracy(["a", "b", "a"], ["a", "b", "b", "a"]) == 0.5
    with pytest.raises(UsageError):
        majority_accuracy([], ["a"])
    train = torch.tensor([[0, 5, 5, 7], [0, 5, 9, 9]])  # 0 is special; 5 is the most frequent other token
    labels = torch.tensor([[-100, 5, 9, -100], [5, -100, -100, 0]])
    assert unigram_accuracy(train, labels, special_ids=[0]) == pytest.approx(2 / 4)


def test_logistic_regression_fits_what_a_linear_model_can():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0]) > 0).long()
    w, b = fit_logistic(x, y, 2, l2=1e-4)
    assert ((x @ w + b).argmax(1) == y).float().mean() > 0.97
    sparse_w, _ = fit_logistic(x.to_sparse(), y, 2, l2=1e-4)
    assert torch.allclose(sparse_w, w, atol=1e-4)


def test_bag_of_words_reads_words_not_their_order():
    rng = random.Random(0)
    cue = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}
    fillers = ["the", "film", "was", "plot", "and", "acting"]

    def sample(n):
        labels = [rng.choice(["pos", "neg"]) for _ in range(n)]
        texts = [" ".join([*rng.sample(fillers, 4), rng.choice(cue[y])]) for y in labels]
        return texts, labels

    train, test = sample(300), sample(200)
    model = BagOfWordsClassifier().fit(*train)
    assert model.accuracy(*test) == 1.0
    assert model.predict(["film was good", "good was film"]) == ["pos", "pos"]
    with pytest.raises(UsageError, match="fit"):
        BagOfWordsClassifier().predict(["x"])
