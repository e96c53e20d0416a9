"""Baselines a trained model has to beat, each computed from the training data alone.

- `majority_accuracy`: always answer the most frequent training label.
- `unigram_accuracy`: masked LM, always predict the most frequent training token.
- `BagOfWordsClassifier`: multinomial logistic regression on bag-of-words features (word order
  thrown away), the classic strong text-classification baseline; written in torch (full-batch
  L-BFGS on the convex objective), so it needs no scikit-learn.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from qkv.errors import UsageError

WORD = re.compile(r"\w+")
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3)  # penalty strengths tried, chosen on a held-out share of the training set


def majority_accuracy(train_labels: Sequence[str], test_labels: Sequence[str]) -> float:
    """Accuracy on `test_labels` of always answering the most frequent training label (ties: first seen)."""
    if not train_labels or not test_labels:
        raise UsageError("majority_accuracy needs training and test labels")
    majority = Counter(train_labels).most_common(1)[0][0]
    return sum(label == majority for label in test_labels) / len(test_labels)


def unigram_accuracy(train_ids: torch.Tensor, labels: torch.Tensor, special_ids: Iterable[int] = ()) -> float:
    """Masked-LM baseline: accuracy at the chosen positions (labels != -100) of always predicting the
    most frequent non-special token of the training ids."""
    counts = torch.bincount(train_ids.flatten().long())
    for i in special_ids:
        if i < len(counts):
            counts[i] = 0
    chosen = labels != -100
    return float((labels[chosen] == int(counts.argmax())).float().mean())


def words(text: str) -> list[str]:
    """The lower-cased word-character runs of a text (identifiers stay whole)."""
    return WORD.findall(text.lower())


class BagOfWordsClassifier:
    """Logistic regression over log(1 + count) word features, each row scaled to unit L2 norm.

    The vocabulary is the training words seen at least `min_count` times (at most `max_words`, most
    frequent first). The L2 penalty is chosen from `L2_GRID` on a seeded 20% of the training set,
    then the model is refitted on all of it.
    """

    def __init__(self, min_count: int = 2, max_words: int = 20000, seed: int = 0) -> None:
        self.min_count, self.max_words, self.seed = min_count, max_words, seed
        self.vocabulary: dict[str, int] = {}
        self.classes: list[str] = []
        self.l2: float | None = None
        self.weight = self.bias = None

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, len(vocabulary)] float32 features, as a sparse COO tensor (a few dozen words per row)."""
        rows, cols, values = [], [], []
        for row, text in enumerate(texts):
            counts = Counter(w for w in words(text) if w in self.vocabulary)
            norm = math.sqrt(sum(math.log1p(n) ** 2 for n in counts.values())) or 1.0
            for word, n in counts.items():
                rows.append(row)
                cols.append(self.vocabulary[word])
                values.append(math.log1p(n) / norm)
        shape = (len(texts), len(self.vocabulary))
        indices = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
        return torch.sparse_coo_tensor(indices, torch.tensor(values), shape, check_invariants=True).coalesce()

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> BagOfWordsClassifier:
        counts = Counter(w for text in texts for w in words(text))
        kept = [w for w, n in counts.most_common(self.max_words) if n >= self.min_count]
        self.vocabulary = {w: i for i, w in enumerate(kept)}
        self.classes = sorted(set(labels))
        y = torch.tensor([self.classes.index(label) for label in labels])
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed)).tolist()
        dev, rest = order[: len(y) // 5], order[len(y) // 5 :]
        x_rest, x_dev = self.features([texts[i] for i in rest]), self.features([texts[i] for i in dev])
        scores = {}
        for l2 in L2_GRID:
            w, b = fit_logistic(x_rest, y[rest], len(self.classes), l2)
            scores[l2] = float(((torch.sparse.mm(x_dev, w) + b).argmax(1) == y[dev]).float().mean())
        self.l2 = max(L2_GRID, key=lambda l2: (scores[l2], l2))  # ties: the stronger penalty
        self.weight, self.bias = fit_logistic(self.features(texts), y, len(self.classes), self.l2)
        return self

    def predict(self, texts: Sequence[str]) -> list[str]:
        if self.weight is None:
            raise UsageError("fit() the classifier before predicting")
        logits = torch.sparse.mm(self.features(texts), self.weight) + self.bias
        return [self.classes[i] for i in logits.argmax(1).tolist()]

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        return sum(p == y for p, y in zip(self.predict(texts), labels)) / len(labels)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: argmin mean CE(x W + b, y) + l2 ||W||² -> (W [F, C], b [C]).

    x: [N, F] features (sparse COO or dense), y: [N] class indices."""
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = (torch.sparse.mm(x, w) if x.is_sparse else x @ w) + b
        loss = F.cross_entropy(logits, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()
