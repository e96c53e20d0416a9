"""Sequence classification: labelled text files, their batches, a classification head on a
pre-trained encoder, and predictions.

Labelled text files (`read_labelled`), one example per line:

    *.tsv, *.txt   LABEL<TAB>TEXT        the label first, so the text may itself hold tabs
    *.jsonl        {"text": "...", "label": "..."}   (a number label is read as its text)

Label names are kept in the model's config (`ModelConfig.extra["labels"]`, saved in the
checkpoint's config.json), so a loaded classifier answers with names, not indices.

Examples are stored as rows of one int64 tensor, [label, length, ids..., pad...], so that the
`BlockLoader` shuffles and resumes them like any other blocks; `classification_batch` turns a
batch of rows into {"input_ids", "attention_mask", "labels"}, cut to the longest row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkv.errors import UsageError
from qkv.models import Encoder

LABELS_KEY = "labels"  # ModelConfig.extra[LABELS_KEY]: the class names, in head order


@dataclass
class LabelledTexts:
    """Texts and their labels (names), in the same order."""

    texts: list[str]
    labels: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise UsageError(f"{len(self.texts)} texts but {len(self.labels)} labels; give one label per text")

    def __len__(self) -> int:
        return len(self.texts)

    def label_names(self) -> list[str]:
        """The distinct labels, sorted (numerically when every label is an integer)."""
        names = set(self.labels)
        numeric = all(n.lstrip("-").isdigit() for n in names)
        return sorted(names, key=int) if numeric else sorted(names)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices])


def read_labelled(path: str | os.PathLike) -> LabelledTexts:
    """Read a labelled text file (format by suffix: .tsv/.txt or .jsonl, see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled data file {path} does not exist")
    jsonl = path.suffix == ".jsonl"
    if not jsonl and path.suffix not in (".tsv", ".txt"):
        raise UsageError(f"{path}: unknown data format {path.suffix!r}; use .tsv (LABEL<TAB>TEXT lines) or .jsonl")
    texts, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str) or "label" not in record:
                raise UsageError(f'{path}:{number}: expected an object {{"text": "...", "label": "..."}}')
            text, label = record["text"], record["label"]
        else:
            label, tab, text = line.partition("\t")
            if not tab:
                raise UsageError(f"{path}:{number}: no tab; each line must be LABEL<TAB>TEXT")
        label = str(label).strip()
        if not label:
            raise UsageError(f"{path}:{number}: the label is empty")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise UsageError(f"{path} holds no examples")
    return LabelledTexts(texts, labels)


def write_labelled(path: str | os.PathLike, data: LabelledTexts) -> Path:
    """Write `data` in the format its suffix names (.jsonl keeps newlines in texts; .tsv cannot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        lines = [json.dumps({"text": t, "label": y}) for t, y in zip(data.texts, data.labels)]
    else:
        bad = next((t for t in data.texts if "\n" in t or "\r" in t), None)
        if bad is not None:
            raise UsageError(f"a TSV line cannot hold a text with a line break ({bad[:40]!r}...); write .jsonl")
        lines = [f"{y}\t{t}" for t, y in zip(data.texts, data.labels)]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- tensors -------------------------------------------------------------------------------------
def encode_examples(
    tokenizer: Any, data: LabelledTexts, label_names: Sequence[str], max_len: int, pad_id: int = 0
) -> torch.Tensor:
    """Rows [N, 2 + max_len] (int64): label index, token count, the ids (special tokens added as the
    tokenizer adds them, cut to max_len keeping a final special token such as [SEP]), padding."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(data.labels) - index.keys())
    if unknown:
        raise UsageError(
            f"the data has label(s) {', '.join(map(repr, unknown[:5]))} that the model's {len(index)} labels "
            f"({', '.join(label_names)}) do not include; use data with the model's labels, or fine-tune from "
            "the pre-trained model so the head is built for these"
        )
    special = {tokenizer.token_to_id(t) for t in tokenizer.all_special_tokens}
    rows = torch.full((len(data), 2 + max_len), pad_id, dtype=torch.long)
    for i, (ids, label) in enumerate(zip(tokenizer.encode_batch(data.texts), data.labels)):
        if len(ids) > max_len:
            ids = ids[: max_len - 1] + ids[-1:] if ids[-1] in special else ids[:max_len]
        if not ids:
            raise UsageError(f"example {i + 1} ({data.texts[i][:40]!r}) encodes to no tokens; drop it")
        rows[i, 0], rows[i, 1] = index[label], len(ids)
        rows[i, 2 : 2 + len(ids)] = torch.tensor(ids)
    return rows


def classification_batch(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows from `encode_examples` [B, 2 + L] -> input_ids, attention_mask [B, T] (T = longest row), labels [B]."""
    rows = rows.long()
    lengths = rows[:, 1]
    width = int(lengths.max())
    mask = torch.arange(width) < lengths[:, None]
    return {"input_ids": rows[:, 2 : 2 + width], "attention_mask": mask.long(), "labels": rows[:, 0]}


def classification_accuracy(batch: dict[str, torch.Tensor], out: Any) -> tuple[int, int]:
    """(correct, counted) argmax predictions against the labels [B]."""
    return int((out.logits.argmax(-1) == batch["labels"]).sum()), len(batch["labels"])


# -- the model -----------------------------------------------------------------------------------
def label_names_of(model: nn.Module) -> list[str]:
    """The class names of a classifier, in head order ("0", "1", ... when none were saved)."""
    cfg = model.config
    if cfg.family not in ("encoder", "vit") or cfg.head != "classification":
        raise UsageError(
            f"this model has no classification head (family {cfg.family!r}, head {cfg.head!r}); fine-tune one "
            "first: qkv finetune --task classification --model MODEL --data FILE"
        )
    names = list(cfg.extra.get(LABELS_KEY) or map(str, range(cfg.num_labels)))
    if len(names) != cfg.num_labels:
        raise UsageError(
            f"the model's config lists {len(names)} label names but its head has {cfg.num_labels} outputs "
            f"(num_labels); fix extra[{LABELS_KEY!r}] in its config.json to name each output once"
        )
    return names


def with_classification_head(model: nn.Module, label_names: Sequence[str]) -> Encoder:
    """An encoder with `model`'s body (weights copied) and a new classification head for `label_names`.

    The head reads BERT's pooler when the body has one (classifier="pooler"), else a dense + GELU
    layer on the first token (ELECTRA's). A model that already is a classifier is returned as is
    when its labels match, and refused when they do not.
    """
    cfg = model.config
    label_names = list(label_names)
    if cfg.family != "encoder":
        raise UsageError(
            f"classification fine-tuning needs an encoder (BERT, ELECTRA, MiniLM, ...); this model's family is "
            f"{cfg.family!r}"
        )
    if len(label_names) < 2:
        raise UsageError(f"classification needs at least 2 labels; the data has {len(label_names)}: {label_names}")
    if cfg.head == "classification":
        have = label_names_of(model)
        if have != label_names:
            raise UsageError(
                f"the model's classification head has {cfg.num_labels} labels ({', '.join(have)}) but the data has "
                f"{len(label_names)} ({', '.join(label_names)}); use data with the head's labels, or fine-tune "
                "from the pre-trained model (without a classification head)"
            )
        return model
    new_cfg = cfg.replace(
        head="classification", classifier="pooler" if cfg.pooler else "dense_gelu", num_labels=len(label_names),
        extra={**cfg.extra, LABELS_KEY: label_names},
    )  # fmt: skip
    parameter = next(model.parameters())
    classifier = Encoder(new_cfg).to(device=parameter.device, dtype=parameter.dtype)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = classifier.load_state_dict(body, strict=False)
    stray = [k for k in missing if not k.startswith("head.")] + list(unexpected)
    if stray:
        raise UsageError(f"the body's weights do not fit the classifier: {', '.join(stray[:5])}")
    classifier.tokenizer = getattr(model, "tokenizer", None)
    return classifier


@torch.no_grad()
def predict(model: nn.Module, texts: Sequence[str], max_len: int | None = None, batch_size: int = 32) -> torch.Tensor:
    """Class probabilities [N, num_labels] of each text, with the model's own tokenizer."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UsageError("the model has no tokenizer to encode the texts with; save it with one")
    names = label_names_of(model)
    max_len = max_len or model.config.max_seq_len
    data = LabelledTexts(list(texts), [names[0]] * len(texts))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rows = encode_examples(tokenizer, data, names, max_len, pad)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = []
    for start in range(0, len(rows), batch_size):
        batch = classification_batch(rows[start : start + batch_size])
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).logits
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(probs) if probs else torch.empty(0, len(names))
