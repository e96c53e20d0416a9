"""BPE merges rebuilt from a vocabulary alone: every cut of a token into two tokens is a merge.

SentencePiece BPE (GGUF ``llama`` vocabularies) and tiktoken rank files store no merges: their
encoders join the adjacent pair whose join ranks best. The same model in `tokenizers` terms is a
merge ``(left, right)`` for every way of cutting a token into two tokens, ordered by the rank of
the joined token, then by the ranks of the parts (as transformers' converters build them).

Looking at every cut costs about the sum of the squared token lengths (each cut slices and hashes
both halves), and a vocabulary such as ``a, aa, aaa, ...`` makes every cut a merge. Real
vocabularies are far from that: their longest tokens have ~128 characters, the average is below
8, and they yield 2 or 3 merges per token (cl100k_base: 233k merges for 100k tokens). So a token
longer than `MAX_TOKEN_LENGTH`, or a vocabulary whose cuts or merges exceed `CUTS_PER_TOKEN` /
`MERGES_PER_TOKEN` per token, is refused before (or as soon as) the work would get out of hand.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sized
from typing import Any, TypeVar

from qkv.errors import TokenizerError

MAX_TOKEN_LENGTH = 1024  # characters (bytes for tiktoken); 8x the longest token of cl100k_base
CUTS_PER_TOKEN = 16  # cuts looked at, on average per token: tokens averaging 17 characters
MERGES_PER_TOKEN = 8  # merges found, on average per token
_SLACK = 4096  # so that tiny test vocabularies with a few long tokens pass

Token = TypeVar("Token", str, bytes)


def check_token_lengths(tokens: Collection[Sized], source: str) -> None:
    """TokenizerError naming `source` if a token is longer than `MAX_TOKEN_LENGTH`."""
    longest = max(map(len, tokens), default=0)
    if longest > MAX_TOKEN_LENGTH:
        raise TokenizerError(
            f"{source}: a token is {longest} characters long; qkv reads tokens of at most {MAX_TOKEN_LENGTH} "
            "(real vocabularies stay below ~200), so the vocabulary is corrupt or hostile"
        )


def merges_from_vocab(
    vocab: Mapping[Token, int], source: str, order: Callable[[int], Any] = lambda token_id: token_id
) -> list[tuple[Token, Token]]:
    """Every ``(left, right)`` with left, right and left + right in `vocab` (token -> id), sorted by
    ``(order(id of left + right), id of left, id of right)``: by default the joined token's id.

    >>> merges_from_vocab({"a": 0, "b": 1, "ab": 2, "abb": 3}, "example")
    [('a', 'b'), ('ab', 'b')]
    """
    check_token_lengths(vocab, source)
    cuts = sum(map(len, vocab)) - len(vocab)
    if cuts > CUTS_PER_TOKEN * len(vocab) + _SLACK:
        raise TokenizerError(
            f"{source}: the {len(vocab)} tokens average {cuts / len(vocab) + 1:.0f} characters; rebuilding "
            f"merges from them would cut each one {CUTS_PER_TOKEN}+ ways (real vocabularies average under 8 "
            "characters), so the vocabulary is corrupt or hostile"
        )
    limit = MERGES_PER_TOKEN * len(vocab) + _SLACK
    ranked = []
    for token, token_id in vocab.items():
        for cut in range(1, len(token)):
            left_id, right_id = vocab.get(token[:cut]), vocab.get(token[cut:])
            if left_id is not None and right_id is not None:
                ranked.append((order(token_id), left_id, right_id, token[:cut], token[cut:]))
        if len(ranked) > limit:
            raise TokenizerError(
                f"{source}: more than {limit} of the tokens' cuts are merges ({MERGES_PER_TOKEN} per token; real "
                "vocabularies have 2 or 3), so the vocabulary is corrupt or hostile"
            )
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
