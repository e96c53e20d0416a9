"""`read_sentence_config`: a sentence-transformers folder's modules.json, Pooling config and
sentence_bert_config.json as one `SentenceEmbeddingConfig`; pipelines qkv cannot reproduce are
refused by name. (The real package's files are checked against sentence-transformers in
test_encode.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkv.embedding import SentenceEmbeddingConfig, read_sentence_config
from qkv.errors import CheckpointError, UsageError

TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def write_model(root: Path, modules: list | None, pooling: dict | None = None, transformer: dict | None = None) -> Path:
    """A sentence-transformers folder holding only the files named (None: left out)."""
    root.mkdir(parents=True, exist_ok=True)
    if modules is not None:
        (root / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (root / "1_Pooling").mkdir()
        (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if transformer is not None:
        (root / "sentence_bert_config.json").write_text(json.dumps(transformer))
    return root


@pytest.mark.parametrize(
    ("pooling", "mode"),
    [
        ({"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True}, "mean"),
        ({"word_embedding_dimension": 8, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"word_embedding_dimension": 8, "pooling_mode_max_tokens": True}, "max"),
        ({"embedding_dimension": 8, "pooling_mode": "cls"}, "cls"),  # sentence-transformers >= 6
        ({"embedding_dimension": 8, "pooling_mode": ["max"]}, "max"),
        ({"word_embedding_dimension": 8}, "mean"),  # no mode set: Pooling's default
    ],
)
def test_pooling_mode_in_either_format(tmp_path, pooling, mode):
    path = write_model(tmp_path, [TRANSFORMER, POOLING], pooling, {"max_seq_length": 77})
    assert read_sentence_config(path) == SentenceEmbeddingConfig(pooling=mode, normalize=False, max_seq_length=77)


def test_normalize_comes_from_modules_json_alone(tmp_path):
    """Normalize has no settings; the package ships no 2_Normalize folder, and none is needed."""
    path = write_model(tmp_path, [TRANSFORMER, POOLING, NORMALIZE], {"pooling_mode_mean_tokens": True}, {})
    assert not (path / "2_Normalize").exists()
    assert read_sentence_config(path).normalize is True


def test_missing_settings_files_fall_back_to_sentence_transformers_defaults(tmp_path):
    """No Pooling config.json: mean pooling; no sentence_bert_config.json: the model's own limit, cased."""
    path = write_model(tmp_path, [TRANSFORMER, POOLING])
    assert read_sentence_config(path) == SentenceEmbeddingConfig("mean", False, None, False)


def test_lowercase_flag(tmp_path):
    path = write_model(tmp_path, [TRANSFORMER, POOLING], {}, {"max_seq_length": 128, "do_lower_case": True})
    assert read_sentence_config(path).lowercase is True


def test_a_plain_encoder_folder_has_no_sentence_config(tmp_path):
    assert read_sentence_config(write_model(tmp_path, None)) is None


@pytest.mark.parametrize(
    ("modules", "pooling", "message"),
    [
        ([TRANSFORMER, POOLING, {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}], {},
         "Transformer -> Pooling -> Dense"),
        ([TRANSFORMER], {}, "lists Transformer;"),
        ([TRANSFORMER, POOLING], {"pooling_mode_weightedmean_tokens": True}, "pooling 'weightedmean'"),
        ([TRANSFORMER, POOLING], {"pooling_mode_mean_sqrt_len_tokens": True}, "pooling 'mean_sqrt_len_tokens'"),
        ([TRANSFORMER, POOLING], {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
         r"pooling \['cls', 'mean'\]"),
        ({"not": "a list"}, {}, "expected a list of modules"),
    ],
)  # fmt: skip
def test_pipelines_qkv_does_not_reproduce_are_refused(tmp_path, modules, pooling, message):
    path = write_model(tmp_path, modules, pooling)
    with pytest.raises(CheckpointError, match=message):
        read_sentence_config(path)


def test_malformed_files(tmp_path):
    path = write_model(tmp_path, [TRANSFORMER, POOLING], {})
    (path / "sentence_bert_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="sentence_bert_config.json: not valid JSON"):
        read_sentence_config(path)
    (path / "sentence_bert_config.json").write_text('{"max_seq_length": -3}')
    with pytest.raises(CheckpointError, match="max_seq_length=-3 must be a positive integer"):
        read_sentence_config(path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"pooling": "sum"}, "pooling='sum' is not supported"), ({"max_seq_length": 0}, "must be a positive integer")],
)
def test_config_validates_its_fields(fields, message):
    with pytest.raises(UsageError, match=message):
        SentenceEmbeddingConfig(**fields)
