"""The sentence-embedding settings a sentence-transformers model directory ships, read as data.

A sentence-transformers model is a pipeline listed in ``modules.json``: a Transformer (whose
``sentence_bert_config.json`` holds ``max_seq_length`` and ``do_lower_case``), a Pooling module
(``<path>/config.json``: the pooling mode) and, optionally, ``Normalize`` (unit-length rows; it
has no settings and no files). `read_sentence_config` turns those files into one frozen
`SentenceEmbeddingConfig`; a pipeline qkv cannot reproduce (a Dense layer, a pooling mode
other than cls/mean/max) is refused by name rather than approximated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkv.errors import CheckpointError, UsageError

POOLING_MODES = ("mean", "cls", "max")

# sentence-transformers' legacy boolean keys in a Pooling config.json, and the mode each one names.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class SentenceEmbeddingConfig:
    """How token states become one sentence vector.

    pooling: "mean" | "cls" | "max" (see `qkv.models.heads.pool`); normalize: unit L2 rows;
    max_seq_length: tokens per text, special tokens included (None: the model's context);
    lowercase: lowercase texts before tokenizing (sentence_bert_config's ``do_lower_case``).
    The defaults are what sentence-transformers builds for a plain encoder directory: mean
    pooling, no normalisation, the model's own length limit.
    """

    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    lowercase: bool = False

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise UsageError(f"pooling={self.pooling!r} is not supported; choose one of {', '.join(POOLING_MODES)}")
        if self.max_seq_length is not None and (
            not isinstance(self.max_seq_length, int) or isinstance(self.max_seq_length, bool) or self.max_seq_length < 1
        ):
            raise UsageError(f"max_seq_length={self.max_seq_length!r} must be a positive integer (or None)")


def read_sentence_config(path: str | os.PathLike) -> SentenceEmbeddingConfig | None:
    """The settings of the sentence-transformers model in directory `path`, or None when it has no
    ``modules.json`` (a plain encoder directory). CheckpointError for a file that is malformed or
    asks for a module or pooling mode qkv does not implement."""
    root = Path(path)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise CheckpointError(f"{modules_file}: expected a list of modules, each with a 'type'")
    kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(kind != "Normalize" for kind in kinds[2:]):
        raise CheckpointError(
            f"{modules_file}: qkv reproduces the pipeline Transformer -> Pooling [-> Normalize], "
            f"this model lists {' -> '.join(kinds)}; embed it with sentence-transformers instead"
        )
    transformer = _read_json(_module_dir(root, modules[0]) / "sentence_bert_config.json", missing={})
    pooling = _read_json(_module_dir(root, modules[1]) / "config.json", missing={})
    max_seq_length = transformer.get("max_seq_length")
    try:
        return SentenceEmbeddingConfig(
            pooling=_pooling_mode(pooling, modules_file.parent / modules[1].get("path", "")),
            normalize="Normalize" in kinds,
            max_seq_length=max_seq_length,
            lowercase=bool(transformer.get("do_lower_case", False)),
        )
    except UsageError as exc:
        raise CheckpointError(f"{root}: {exc}") from None


def _module_dir(root: Path, module: dict[str, Any]) -> Path:
    """A module's folder: ``path`` in modules.json, relative to the model directory."""
    return root / str(module.get("path", ""))


def _pooling_mode(config: dict[str, Any], where: Path) -> str:
    """The one pooling mode a Pooling config names: the ``pooling_mode`` key (sentence-transformers
    >= 6) or the legacy ``pooling_mode_*_tokens`` booleans; none set means mean, as in
    sentence-transformers' `Pooling`."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = modes if len(modes) != 1 else modes[0]
        if not modes:
            mode = "mean"
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in POOLING_MODES:
        raise CheckpointError(
            f"{where}: pooling {mode!r} is not one qkv implements ({', '.join(POOLING_MODES)}); "
            "embed this model with sentence-transformers instead"
        )
    return mode


def _read_json(file: Path, missing: Any = None) -> Any:
    """The parsed JSON in `file`; `missing` when it does not exist (None: that is an error)."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing is None:
            raise CheckpointError(f"{file} is missing") from None
        return missing
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
