"""`qkv.load` alone carries a sentence-transformers model's settings, so `qkv.embed` needs nothing else."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.embedding import load_sentence_model


@pytest.mark.real
def test_qkv_load_reads_the_sentence_settings():
    model = qkv.load("all-minilm-l6-v2")
    assert (model.sentence_config.pooling, model.sentence_config.normalize) == ("mean", True)
    assert model.sentence_config.max_seq_length == 256
    texts = ["A cat sits on the mat.", "", "東京"]
    reference = qkv.embed(load_sentence_model("all-minilm-l6-v2"), None, texts)
    assert torch.equal(qkv.embed(model, model.tokenizer, texts), reference)
