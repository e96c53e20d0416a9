"""Perplexity of a language model over a token sequence, and a held-out English text to measure it on.

    ids = tok.encode(heldout_text())
    result = perplexity(model, ids, window=512, progress=print_progress)
    result.ppl

The protocol (shared with llama.cpp's runner, `qkv.peers.llama_cpp_runner ppl`, so numbers compare):
the ids are cut into consecutive, non-overlapping windows of `window` tokens; each window is
scored from an empty context (a fresh forward, no cache carried over); the negative
log-likelihood (natural log) of tokens 1..n-1 of each window given the ones before them is
summed; a last, shorter window counts when it has at least 2 tokens. ppl = exp(nll_sum / count).
"""

from __future__ import annotations

import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qkv.errors import UsageError

__all__ = ["HELDOUT_MODULES", "Perplexity", "heldout_text", "perplexity", "print_progress"]


@dataclass(frozen=True)
class Perplexity:
    """Summed negative log-likelihood (nats) of `count` predicted tokens, and exp(nll_sum / count)."""

    nll_sum: float
    count: int
    ppl: float


# (windows done, windows in all, perplexity so far) after each window.
Progress = Callable[[int, int, float], None]


def print_progress(done: int, total: int, ppl: float) -> None:
    """A `progress` callback for `perplexity`: one line on stderr per window."""
    print(f"qkv: perplexity window {done}/{total}: {ppl:.4f} so far", file=sys.stderr, flush=True)


def perplexity(
    model: nn.Module,
    ids: torch.Tensor | Sequence[int],
    window: int = 512,
    progress: Progress | None = None,
    chunk: int | None = None,
) -> Perplexity:
    """Perplexity of `model` (a causal LM: `model(input_ids [1, T]).logits` -> [1, T, V]) on `ids`
    ([T] or [1, T]), by the windowed protocol in this module's docstring.

    Runs under `torch.no_grad` in the model's own dtype; the log-softmax is taken in float32.
    `progress` is called after each window (see `print_progress`). `chunk` runs each window
    `chunk` tokens per forward through a KV cache (`model.new_cache` / `model.decode`, the
    generation protocol), so a long window's activations and logits grow with the chunk, not the
    window; the numbers are those of one forward per window (to float rounding), except under
    dynamic NTK RoPE scaling, whose base follows the longest position seen so far (as in cached
    generation) rather than the whole window's.
    """
    ids = _check_ids(model, ids, window)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise UsageError(f"chunk={chunk!r} must be a positive number of tokens (or None: one forward per window)")
    if chunk is not None and not (hasattr(model, "new_cache") and hasattr(model, "decode")):
        raise UsageError(f"chunk= needs a model with a KV cache (new_cache/decode); {type(model).__name__} has none")
    device = next(model.parameters()).device
    starts = [s for s in range(0, len(ids), window) if len(ids) - s >= 2]
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for done, start in enumerate(starts, 1):
            piece = ids[start : start + window].to(device)
            nll_sum += _window_nll(model, piece, chunk)
            count += len(piece) - 1
            if progress is not None:
                progress(done, len(starts), math.exp(nll_sum / count))
    return Perplexity(nll_sum=nll_sum, count=count, ppl=math.exp(nll_sum / count))


def _window_nll(model: nn.Module, piece: torch.Tensor, chunk: int | None) -> float:
    """Summed NLL of piece[1:] given what precedes each token (row t predicts token t + 1): one
    forward of the window, or its tokens but the last fed `chunk` at a time through a cache. A
    window past a dynamic-NTK model's trained length runs in one forward even so
    (`rope_follows_length`), its logits still made `chunk` rows at a time from the hidden states."""
    from qkv.generation.context import rope_follows_length

    if chunk is None:
        logits = model(piece[None]).logits[0, :-1]  # [n - 1, V]
        return float(F.cross_entropy(logits.float(), piece[1:], reduction="sum"))
    inputs, nll = piece[:-1], 0.0
    if rope_follows_length(model.config, len(inputs)):
        hidden = model(inputs[None], logits_to_keep=1).last_hidden_state[0]  # [n - 1, D]
        chunks = ((model.lm_head(hidden[s : s + chunk]), s) for s in range(0, len(inputs), chunk))
    else:
        cache = model.new_cache(1, len(inputs))
        chunks = ((model.decode(inputs[None, s : s + chunk], cache)[0], s) for s in range(0, len(inputs), chunk))
    for logits, start in chunks:  # [chunk, V]
        nll += float(F.cross_entropy(logits.float(), piece[start + 1 : start + 1 + chunk], reduction="sum"))
    return nll


def _check_ids(model: nn.Module, ids: torch.Tensor | Sequence[int], window: int) -> torch.Tensor:
    """The ids as a LongTensor [T], after checking the window, the length and the vocabulary."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise UsageError(f"window={window!r}: a window needs at least 2 tokens (one to predict from, one to score)")
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "context_limit", getattr(cfg, "max_seq_len", None))
    if limit is not None and window > limit:
        raise UsageError(
            f"window={window} is longer than the model's context ({limit} tokens); use a smaller one, "
            "or stretch a RoPE model's context (qkv.generation.scale_rope)"
        )
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids) if len(ids) else torch.zeros(0, dtype=torch.long)  # [] would be float32
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UsageError(f"ids must be integer token ids of shape [T] or [1, T], got {ids.dtype} {tuple(ids.shape)}")
    if len(ids) < 2:
        raise UsageError(f"perplexity needs at least 2 token ids (one to predict from, one to score), got {len(ids)}")
    vocab = getattr(cfg, "vocab_size", None)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise UsageError(f"token ids must lie in [0, {vocab}) for this model; found ids from {low} to {high}")
    return ids.long()


# -- a held-out text ---------------------------------------------------------------------------
# Pure-Python standard-library modules whose documentation is the same on every OS: nothing here
# documents paths, platform quirks or C accelerators that a build may lack.
HELDOUT_MODULES = (
    "textwrap", "difflib", "fractions", "statistics", "string", "heapq", "bisect", "calendar",
    "argparse", "json", "csv", "dataclasses", "enum", "functools", "contextlib", "typing",
    "html", "urllib.parse", "email.message", "http.client", "logging", "unittest.case", "doctest",
    "pprint", "shlex", "gettext", "configparser", "zipfile", "tarfile", "inspect", "ast",
)  # fmt: skip
# Lines that could differ between machines: memory addresses, absolute file paths.
_MACHINE_LINE = re.compile(r"0x|site-packages|(?:^|[\s'\"(])/(?:usr|home|tmp|opt|lib|etc|var|root)/")


def heldout_text(min_chars: int = 80_000) -> str:
    """At least `min_chars` characters of English prose about Python (80k: about 21k SmolLM2 tokens):
    the docstrings of the modules in `HELDOUT_MODULES` and of their public functions and classes,
    in a fixed order (modules as listed, members sorted by name).

    Deterministic for a given Python version (the docstrings are the interpreter's own; lines
    naming a memory address or an absolute path are dropped), so perplexities measured on it
    compare across machines and runs with the same Python.
    """
    import importlib

    pieces, size = [], 0
    for module_name in HELDOUT_MODULES:
        module = importlib.import_module(module_name)
        for doc in _docs(module):
            text = "\n".join(line for line in doc.splitlines() if not _MACHINE_LINE.search(line)).strip()
            if text:
                pieces.append(text)
                size += len(text) + 2
            if size >= min_chars:
                return "\n\n".join(pieces)
    raise UsageError(f"the held-out modules hold {size} characters of documentation, fewer than min_chars={min_chars}")


def _docs(module: object) -> list[str]:
    """The module's docstring, then those of the functions and classes it defines, by name."""
    docs = [_own_doc(module)]
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and _own_doc(obj):
            docs.append(f"{name}\n{_own_doc(obj)}")
    return docs


def _own_doc(obj: object) -> str:
    """The object's own docstring, cleaned (never one inherited from a base class, as `inspect.getdoc` gives)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""
