"""Reading tokenizer files: errors that name the file and say what is wrong with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkv.errors import TokenizerError
from qkv.formats import jsonfile


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; a TokenizerError names the file when it is missing, empty or not UTF-8."""
    data = jsonfile.read_user_bytes(path, what, TokenizerError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def read_json(path: Path, what: str, expect: type = dict) -> Any:
    """Parse the JSON file ``path``; a TokenizerError says which file and what is wrong with it
    (missing, empty, not UTF-8, a syntax error with its line and column, nested too deeply)."""
    return jsonfile.read_json(path, what, TokenizerError, expect)
