"""qkv: transformer models in one readable PyTorch codebase.

import qkv
model = qkv.DecoderLM(qkv.ModelConfig.from_name("tiny-llama"))
ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8)
"""

from qkv.cache import KVCache
from qkv.config import ModelConfig
from qkv.errors import CheckpointError, QkvError, TokenizerError
from qkv.generation import generate
from qkv.generation.text import complete, stream
from qkv.load import load
from qkv.models import DecoderLM, ModelOutput
from qkv.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DecoderLM",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "QkvError",
    "Tokenizer",
    "TokenizerError",
    "complete",
    "generate",
    "load",
    "load_tokenizer",
    "stream",
]
