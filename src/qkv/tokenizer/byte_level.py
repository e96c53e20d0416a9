"""GPT-2's byte-level alphabet: every byte written as one printable character.

Byte-level BPE vocabularies (GPT-2's ``vocab.json``, ``tokenizer.json``, GGUF ``gpt2`` vocabularies)
store tokens as strings over this alphabet, so ``b" the"`` is spelled ``"Ġthe"``. Printable Latin-1
bytes map to themselves; the other 68 bytes (controls, space, ...) map to U+0100 onwards in byte
order (Radford et al. 2019, GPT-2 ``encoder.py``, ``bytes_to_unicode``).
"""

from __future__ import annotations


def _byte_to_char() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR: dict[int, str] = _byte_to_char()
ALPHABET: frozenset[str] = frozenset(BYTE_TO_CHAR.values())

# Latin-1 decoding turns each byte into the code point of the same value; translating those code
# points spells the bytes in the alphabet in one C-level pass.
_TRANSLATION = str.maketrans({b: c for b, c in BYTE_TO_CHAR.items()})


def bytes_to_piece(data: bytes) -> str:
    """Spell ``data`` in the byte-level alphabet: ``bytes_to_piece(b" the") == "Ġthe"``."""
    return data.decode("latin-1").translate(_TRANSLATION)
