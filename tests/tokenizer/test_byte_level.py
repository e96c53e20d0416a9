"""GPT-2's byte alphabet, as the reference implementations spell it."""

from tokenizers import pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from qkv.tokenizer.byte_level import ALPHABET, BYTE_TO_CHAR, bytes_to_piece


def test_alphabet_equals_gpt2s():
    assert bytes_to_unicode() == BYTE_TO_CHAR
    assert set(pre_tokenizers.ByteLevel.alphabet()) == ALPHABET


def test_bytes_to_piece():
    assert bytes_to_piece(b" the") == "Ġthe"
    assert bytes_to_piece("é\n".encode()) == "Ã©Ċ"  # 0xC3 0xA9 are printable Latin-1, 0x0A is not
    assert bytes_to_piece(bytes(range(256))) == "".join(BYTE_TO_CHAR[b] for b in range(256))
