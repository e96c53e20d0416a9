"""Chat templates: the Jinja template a model ships, rendered in a sandbox.

Templates come from model files (tokenizer_config.json ``chat_template``, GGUF
``tokenizer.chat_template``) and are untrusted input, so they run in Jinja's
``ImmutableSandboxedEnvironment``: no access to Python internals (``''.__class__``), no mutation
of the messages passed in. The environment offers what real templates use, as transformers does
(``transformers/utils/chat_template_utils.py``): ``raise_exception``, ``strftime_now``, the
``tojson`` filter, ``bos_token``/``eos_token``/... variables and ``{% break %}``/``{% continue %}``.

    >>> render_chat_template(CHAT_TEMPLATES["chatml"], [{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from qkv.errors import TokenizerError

# Built-in templates, for models that ship none (asked for by name, never applied silently).
CHAT_TEMPLATES: dict[str, str] = {
    # ChatML (OpenAI, used by Qwen, SmolLM, ...).
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


class _TemplateRaised(jinja2.TemplateError):
    """Raised by a template's own ``raise_exception(...)`` call."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &) and sorts keys; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing at the first unsafe access (``''.__class__``) rather than
    rendering it as an empty undefined value."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from None


def resolve_template(template: str | None, shipped: str | None) -> str:
    """The template source to render: ``template`` (a built-in name or Jinja source) if given,
    else the model's own; TokenizerError when there is neither."""
    if template is None:
        if shipped is None:
            raise TokenizerError(
                "this tokenizer has no chat template (none in tokenizer_config.json or the GGUF "
                f"metadata); pass template= with one of {sorted(CHAT_TEMPLATES)} or a Jinja template"
            )
        return shipped
    return CHAT_TEMPLATES.get(template, template)


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render the Jinja ``source`` with ``messages`` and ``variables`` in the sandbox.

    TokenizerError when the template has a syntax error, raises (its message is kept), tries to
    reach outside the sandbox, or fails in any other way.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(
            f"messages must be a list of {{'role': ..., 'content': ...}}, got {type(messages).__name__}"
        )
    template = _compile(source)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except _TemplateRaised as exc:
        raise TokenizerError(f"chat template raised an error: {exc.message}") from None
    except SecurityError as exc:
        raise TokenizerError(f"chat template tried to reach outside its sandbox: {exc}") from None
    except Exception as exc:  # a template is untrusted code: any failure is a bad template, reported as such
        raise TokenizerError(f"chat template failed: {type(exc).__name__}: {exc}") from None
