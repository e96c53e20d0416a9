"""`Encoder` (BERT, RoBERTa, ELECTRA) against Hugging Face `transformers`, loaded through `qkv.load`.

Each case is a tiny random HF model with an awkward shape (6 heads of 8, 3 token types, an
ELECTRA embedding narrower than the model, untied MLM decoders), saved by `save_pretrained` and
read back by qkv's own loader: logits, every hidden state, the pooler output, attention weights
and losses must equal HF's with token_type_ids and a padding mask, and export must round-trip.
"""

from __future__ import annotations

import functools

import pytest
import torch

import qkv
from qkv.checkpoints import export_hf
from qkv.errors import UsageError

transformers = pytest.importorskip("transformers")

TOL = 1e-4
_BODY = dict(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=80,
             max_position_embeddings=40, type_vocab_size=3)  # fmt: skip
# case -> (HF class, config class, extra config)
CASES = {
    "bert": ("BertModel", "BertConfig", {}),
    "bert-mlm": ("BertForMaskedLM", "BertConfig", {}),
    "bert-mlm-untied": ("BertForMaskedLM", "BertConfig", {"tie_word_embeddings": False}),
    "bert-seqcls-3": ("BertForSequenceClassification", "BertConfig", {"num_labels": 3}),
    "bert-tokcls-5": ("BertForTokenClassification", "BertConfig", {"num_labels": 5}),
    "roberta": ("RobertaModel", "RobertaConfig", {"pad_token_id": 1, "type_vocab_size": 1}),
    "roberta-mlm": ("RobertaForMaskedLM", "RobertaConfig", {"pad_token_id": 1, "type_vocab_size": 1}),
    "roberta-seqcls": ("RobertaForSequenceClassification", "RobertaConfig", {"pad_token_id": 1, "num_labels": 4}),
    "electra-rtd": ("ElectraForPreTraining", "ElectraConfig", {"embedding_size": 24}),
    "electra-mlm": ("ElectraForMaskedLM", "ElectraConfig", {"embedding_size": 24}),
    "electra-seqcls": ("ElectraForSequenceClassification", "ElectraConfig", {"embedding_size": 24, "num_labels": 3}),
}


@functools.cache
def _pair(case: str, tmp_root: str) -> tuple:
    """(HF model, qkv model loaded from its save_pretrained directory, the directory)."""
    cls, config_cls, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**_BODY, **extra}, attn_implementation="eager")  # returns weights
    hf = getattr(transformers, cls)(config).eval()
    path = f"{tmp_root}/{case}"
    hf.save_pretrained(path)
    return hf, qkv.load(path), path


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("encoders"))


def _inputs(hf, batch: int = 3, length: int = 12):
    """ids without the pad token, a mask with two padded rows (padding = pad id), token types."""
    cfg = hf.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, cfg.pad_token_id or 0)
    types = torch.randint(0, cfg.type_vocab_size, (batch, length), generator=g)
    return ids, mask, types


def _hf_logits(out):
    return getattr(out, "logits", None)


@pytest.mark.parametrize("case", CASES)
def test_logits_hidden_states_and_pooler_equal_hf(case, tmp_root):
    hf, model, _ = _pair(case, tmp_root)
    ids, mask, types = _inputs(hf)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True, output_attentions=True)
        ours = model(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True, output_attentions=True)
    assert type(model) is qkv.models.Encoder
    hidden = ref.hidden_states
    assert len(ours.hidden_states) == len(hidden)
    for a, b in zip(ours.hidden_states, hidden, strict=True):
        assert (a - b).abs().max().item() <= TOL
    for a, b in zip(ours.attentions, ref.attentions, strict=True):
        assert (a - b).abs().max().item() <= TOL
    if _hf_logits(ref) is not None:
        assert ours.logits.shape == ref.logits.shape
        assert (ours.logits - ref.logits).abs().max().item() <= TOL
    else:
        assert ours.logits is None
        assert (ours.last_hidden_state - ref.last_hidden_state).abs().max().item() <= TOL
    if getattr(ref, "pooler_output", None) is not None:
        assert (ours.pooler_output - ref.pooler_output).abs().max().item() <= TOL


LABELS = {
    "bert-mlm": "mlm",
    "roberta-mlm": "mlm",
    "electra-mlm": "mlm",
    "bert-seqcls-3": "classification",
    "roberta-seqcls": "classification",
    "bert-tokcls-5": "token",
    "electra-rtd": "rtd",
}


@pytest.mark.parametrize("case", LABELS)
def test_loss_equals_hf(case, tmp_root):
    hf, model, _ = _pair(case, tmp_root)
    ids, mask, types = _inputs(hf)
    g = torch.Generator().manual_seed(2)
    kind = LABELS[case]
    if kind == "mlm":
        labels = ids.masked_fill(torch.rand(ids.shape, generator=g) > 0.3, -100)
    elif kind == "classification":
        labels = torch.randint(0, hf.config.num_labels, (ids.shape[0],), generator=g)
    elif kind == "token":
        labels = torch.randint(0, hf.config.num_labels, ids.shape, generator=g).masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, 2, ids.shape, generator=g)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
        ours = model(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
    assert abs(ours.item() - ref.item()) <= TOL


@pytest.mark.parametrize("case", ["bert-mlm", "roberta-mlm", "electra-rtd"])
def test_padding_never_changes_the_real_tokens(case, tmp_root):
    hf, model, _ = _pair(case, tmp_root)
    ids, mask, types = _inputs(hf)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = model(ids[row : row + 1, :n], token_type_ids=types[row : row + 1, :n]).last_hidden_state
            assert (alone[0] - batched[row, :n]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["bert", "bert-mlm-untied", "roberta-seqcls", "electra-rtd", "electra-mlm"])
def test_export_round_trips_through_transformers(case, tmp_root, tmp_path):
    hf, model, _ = _pair(case, tmp_root)
    out = export_hf(model, tmp_path / "export")
    again = getattr(transformers, CASES[case][0]).from_pretrained(out).eval()
    ids, mask, types = _inputs(hf)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, token_type_ids=types)
        b = again(ids, attention_mask=mask, token_type_ids=types)
    key = "logits" if _hf_logits(a) is not None else "last_hidden_state"
    assert (getattr(a, key) - getattr(b, key)).abs().max().item() <= TOL


def test_attention_maps_are_bidirectional(tmp_root):
    _, model, _ = _pair("bert", tmp_root)
    with torch.no_grad():
        weights = model(torch.randint(3, 99, (1, 6)), output_attentions=True).attentions[0]
    assert weights[0, :, 0, 5].min().item() > 0  # the first token sees the last


def test_bad_input_names_the_limit(tmp_root):
    _, model, _ = _pair("bert-seqcls-3", tmp_root)
    ids = torch.randint(3, 99, (2, 8))
    with pytest.raises(ValueError, match="exceeds the model's context of 40"):
        model(torch.randint(3, 99, (1, 41)))
    with pytest.raises(ValueError, match=r"token type id 3 is outside \[0, 3\)"):
        model(ids, token_type_ids=torch.full_like(ids, 3))
    with pytest.raises(UsageError, match="does not fit the head's 3 labels"):
        model(ids, labels=torch.tensor([0, 3]))
    with pytest.raises(UsageError, match=r"labels must have shape \(2,\)"):
        model(ids, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(UsageError, match="cannot generate text"):
        model.generate(ids, 4)


def test_unknown_architecture_is_refused(tmp_root, tmp_path):
    import json
    import shutil

    _, _, path = _pair("bert", tmp_root)
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["BertForQuestionAnswering"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(qkv.CheckpointError, match="BertForQuestionAnswering.*not supported.*BertForMaskedLM"):
        qkv.load(tmp_path / "m")
