"""qkv: transformer models in one readable PyTorch codebase.

import qkv
model = qkv.DecoderLM(qkv.ModelConfig.from_name("tiny-llama"))
ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8)

The public names below are imported on first use (PEP 562), so `import qkv.tokenizer` or
`import qkv.formats` loads no model code, and `import qkv` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "qkv.errors",
    "QkvError": "qkv.errors",
    "TokenizerError": "qkv.errors",
    "UsageError": "qkv.errors",
    "KVCache": "qkv.cache",
    "ModelConfig": "qkv.config",
    "DecoderLM": "qkv.models",
    "Encoder": "qkv.models",
    "EncoderDecoder": "qkv.models",
    "ModelOutput": "qkv.models",
    "GenerationConfig": "qkv.generation",
    "generate": "qkv.generation",
    "complete": "qkv.generation.text",
    "stream": "qkv.generation.text",
    "embed": "qkv.embedding",
    "load": "qkv.loading",
    "Tokenizer": "qkv.tokenizer",
    "load_tokenizer": "qkv.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qkv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
