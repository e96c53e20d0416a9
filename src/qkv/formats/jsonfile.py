"""JSON from files qkv did not write (config.json, tokenizer.json, an index, a safetensors header).

`json.loads` can fail three ways on such a file: bad syntax, bytes that are not UTF-8, and arrays
or objects nested so deeply that the parser runs out of recursion (`RecursionError`, a few
thousand ``[`` are enough). Each becomes the caller's qkv error type with a message naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qkv.errors import CheckpointError, QkvError


def parse_json(text: str | bytes, origin: str, error: type[QkvError] = CheckpointError) -> Any:
    """The value of JSON `text` read from `origin` (named in the error); every failure is `error`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{origin} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{origin} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (is the file truncated?)"
        ) from None
    except RecursionError:
        raise error(
            f"{origin} nests JSON arrays or objects too deeply to parse; real files nest a few levels, "
            "so this one is corrupt or made to crash parsers"
        ) from None


def read_user_bytes(path: Path, what: str, error: type[QkvError] = CheckpointError) -> bytes:
    """The bytes of a file a user gave (described as `what` in errors); `error` when it is missing,
    unreadable or empty."""
    origin = f"{what} {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{origin} does not exist") from None
    except OSError as exc:
        raise error(f"cannot read {origin}: {exc.strerror or exc}") from None
    if not data.strip():
        raise error(f"{origin} is empty")
    return data


def read_json(path: Path, what: str, error: type[QkvError] = CheckpointError, expect: type = dict) -> Any:
    """The JSON value in file `path` (described as `what` in errors), which must be an `expect`."""
    origin = f"{what} {path}"
    value = parse_json(read_user_bytes(path, what, error), origin, error)
    if not isinstance(value, expect):
        expected = "object" if expect is dict else expect.__name__
        raise error(f"{origin} holds a JSON {type(value).__name__}, expected a JSON {expected}")
    return value
