"""`GenerationConfig`: every decoding option, written down once.

`generate`, `complete`, `stream`, beam search, speculative decoding and the CLI all take one of
these; keyword arguments are a shorthand that builds it (`GenerationConfig.build`), so an option
has one name and one validation everywhere. A misspelt option is an error that names it, and an
option that the chosen decoding path cannot honour is refused (`check_supported`), never dropped.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qkv.errors import GenerationOptionError
from qkv.generation.constrained import check_json_schema


def _ids(value: int | Sequence[int] | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    ids = (value,) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise GenerationOptionError(f"{name}={value!r} must be a token id or a list of token ids (integers >= 0)")
    return ids


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options. `temperature=0` is greedy; `num_beams > 1` is beam search (sampled beams
    when temperature > 0, as HF's `do_sample=True, num_beams>1`)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None  # CTRL's; 1 or None disables it
    frequency_penalty: float = 0.0  # OpenAI's, over generated tokens
    presence_penalty: float = 0.0
    seed: int | None = None  # sampling is reproducible when set
    num_return_sequences: int = 1
    # A prompt is fed this many tokens per forward through the KV cache, so the prefill's
    # activations grow with the chunk, not the prompt (None: the whole prompt in one forward)
    prefill_chunk: int | None = 512
    # Beam search
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never" (see qkv.generation.beam)
    no_repeat_ngram_size: int = 0
    # Stopping
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded generated text
    eos_token_id: tuple[int, ...] | None = None  # None: the tokenizer's or the model config's
    pad_token_id: int | None = None  # fills finished rows; None: the first EOS id, else 0
    # What to report
    logprobs: bool = False  # log p of each chosen token
    top_logprobs: int = 0  # and the N most likely alternatives
    # Constrained decoding (qkv.generation.constrained): the output is a JSON document valid under
    # this JSON Schema (a dict or its JSON text; {"type": "object"} = any object, OpenAI's json_object)
    json_schema: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.stop, str):
            set_(self, "stop", (self.stop,))
        else:
            set_(self, "stop", tuple(self.stop or ()))
        set_(self, "eos_token_id", _ids(self.eos_token_id, "eos_token_id"))
        if self.json_schema is not None:
            set_(self, "json_schema", check_json_schema(self.json_schema))
        self._validate()

    def _validate(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise GenerationOptionError(f"{name}={value!r} must be an integer >= {low}")

        def number(name: str, ok: Callable[[float], bool], rule: str) -> None:
            value = getattr(self, name)
            real = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not real or not ok(value):
                raise GenerationOptionError(f"{name}={value!r} must be {rule}")

        for name, low in (("max_new_tokens", 1), ("num_return_sequences", 1), ("num_beams", 1)):
            integer(name, low)
        for name in ("no_repeat_ngram_size", "top_logprobs"):
            integer(name, 0)
        number("temperature", lambda t: t >= 0, "a finite number >= 0 (0 = greedy)")
        if self.top_k is not None:
            integer("top_k", 0)
        if self.prefill_chunk is not None:
            integer("prefill_chunk", 1)
        for name in ("top_p", "typical_p"):
            if getattr(self, name) is not None:
                number(name, lambda p: 0.0 < p <= 1.0, "in (0, 1]")
        if self.min_p is not None:
            number("min_p", lambda p: 0.0 <= p <= 1.0, "in [0, 1]")
        if self.repetition_penalty is not None:
            number("repetition_penalty", lambda r: r > 0, "a number > 0 (1 disables it)")
        for name in ("frequency_penalty", "presence_penalty", "length_penalty"):
            number(name, lambda _: True, "a finite number")
        if self.early_stopping not in (True, False, "never"):
            raise GenerationOptionError(f"early_stopping={self.early_stopping!r} must be True, False or 'never'")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationOptionError(f"stop={list(self.stop)!r}: stop strings must be non-empty strings")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise GenerationOptionError(f"seed={self.seed!r} must be an integer")
        if self.pad_token_id is not None:
            integer("pad_token_id", 0)
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise GenerationOptionError(
                f"num_return_sequences={self.num_return_sequences} must be <= num_beams={self.num_beams}"
            )
        beam_only = {
            "length_penalty": self.length_penalty != 1.0,
            "early_stopping": self.early_stopping is not False,
            "no_repeat_ngram_size": self.no_repeat_ngram_size != 0,
        }
        used = [name for name, set_ in beam_only.items() if set_]
        if used and self.num_beams == 1:
            raise GenerationOptionError(f"{', '.join(used)} only apply to beam search; set num_beams > 1")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, config: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
        """`config` (default: all defaults) with `options` overriding its fields.

        An unknown option is a TypeError naming it and the closest known name; max_new_tokens=None
        keeps the config's.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(f"unknown generation option {', '.join(hints)}; known options: {', '.join(names)}")
        if config is not None and not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        if options.get("max_new_tokens", 0) is None:  # a positional max_new_tokens left unset
            del options["max_new_tokens"]
        return dataclasses.replace(config or cls(), **options)

    # -- derived --------------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    def check_supported(self, path: str) -> None:
        """Refuse the options that decoding path `path` ("sample", "beam", "speculative") cannot honour."""
        defaults = GenerationConfig()
        if path == "beam":
            unsupported = {"logprobs": self.wants_logprobs, "json_schema": self.json_schema is not None}
        elif path == "speculative":
            keep = {"max_new_tokens", "eos_token_id", "pad_token_id", "prefill_chunk"}
            unsupported = {
                f.name: getattr(self, f.name) != getattr(defaults, f.name)
                for f in dataclasses.fields(self)
                if f.name not in keep and f.name not in ("logprobs", "top_logprobs")
            }
            unsupported["logprobs"] = self.wants_logprobs
        else:
            unsupported = {}
        refused = [name for name, used in unsupported.items() if used]
        if refused:
            what = {"beam": "beam search (num_beams > 1)", "speculative": "speculative decoding (greedy only)"}[path]
            raise GenerationOptionError(f"{', '.join(refused)} cannot be used with {what}; drop it or change the mode")
