"""Sentence embeddings: `embed` texts with an encoder, compare them, search a folder of notes.

import qkv
model = qkv.embedding.load_sentence_model("all-minilm-l6-v2")   # settings from modules.json & co
vectors = qkv.embed(model, model.tokenizer, ["a cat", "a dog"])  # [2, 384], unit rows
"""

from qkv.embedding.config import SentenceEmbeddingConfig, read_sentence_config
from qkv.embedding.encode import embed, load_sentence_model

__all__ = ["SentenceEmbeddingConfig", "embed", "load_sentence_model", "read_sentence_config"]
