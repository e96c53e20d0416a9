"""`qkv tokenizer train|encode|decode|info`: train a tokenizer, or look inside one.

SOURCE is a tokenizer file or directory (tokenizer.json, vocab.json + merges.txt, vocab.txt,
*.tiktoken, *.gguf) or a known model name (`qkv models`).

  qkv tokenizer train --kind bpe --vocab-size 8000 corpus/*.txt --out tok/
  qkv tokenizer encode cl100k_base "Hello world"          (--json for machine-readable output)
  qkv tokenizer decode cl100k_base 9906 1917
  qkv tokenizer info all-minilm-l6-v2
"""

from __future__ import annotations

import argparse
import json
import sys

from qkv.cli.args import non_negative_int, positive_int

# Alternating background colours marking token boundaries on a terminal.
_COLOURS = ("\x1b[48;5;24m", "\x1b[48;5;58m", "\x1b[48;5;22m", "\x1b[48;5;90m")
_RESET = "\x1b[0m"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train, inspect and run tokenizers", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    train = actions.add_parser("train", help="train byte-level BPE or WordPiece on text files")
    train.add_argument("files", nargs="+", metavar="FILE", help="text files to train on")
    train.add_argument("--kind", choices=("bpe", "wordpiece"), default="bpe")
    train.add_argument("--vocab-size", type=positive_int, required=True)
    train.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    train.add_argument("--special-token", action="append", default=None, metavar="TOKEN",
                       help="a special token (repeatable); BPE default: <|endoftext|>")  # fmt: skip
    train.add_argument("--min-frequency", type=non_negative_int, default=2)
    train.add_argument("--cased", action="store_true", help="WordPiece: keep case (default: lowercase)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train)

    encode = actions.add_parser("encode", help="show the tokens of a text")
    encode.add_argument("source", metavar="SOURCE")
    encode.add_argument("text", metavar="TEXT", help="the text; - reads standard input")
    encode.add_argument("--json", action="store_true", help="print ids, tokens and offsets as JSON")
    encode.add_argument("--no-special", action="store_true", help="do not add BOS/[CLS]/... around the text")
    encode.add_argument("--allowed-special", default=None, metavar="all|none|TOK,TOK",
                        help="special tokens recognised in the text (default: the tokenizer's)")  # fmt: skip
    encode.set_defaults(func=run_encode)

    decode = actions.add_parser("decode", help="turn token ids back into text")
    decode.add_argument("source", metavar="SOURCE")
    decode.add_argument("ids", nargs="+", type=int, metavar="ID")
    decode.add_argument("--skip-special", action="store_true", help="leave special tokens out")
    decode.set_defaults(func=run_decode)

    info = actions.add_parser("info", help="kind, vocabulary size, special tokens, chat template")
    info.add_argument("source", metavar="SOURCE")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=run_info)


def run_train(args: argparse.Namespace) -> int:
    from qkv.tokenizer import train_tokenizer

    tok = train_tokenizer(
        kind=args.kind,
        vocab_size=args.vocab_size,
        files=args.files,
        special_tokens=args.special_token,
        min_frequency=args.min_frequency,
        lowercase=not args.cased,
        show_progress=not args.quiet,
    )
    path = tok.save(args.out)
    print(f"{tok.kind} tokenizer with {tok.vocab_size} tokens written to {path}")
    return 0


def _allowed_special(value: str | None) -> str | set[str] | None:
    if value is None or value == "all":
        return value
    return set() if value == "none" else {t for t in value.split(",") if t}


def run_encode(args: argparse.Namespace) -> int:
    from qkv.tokenizer import load_tokenizer

    tok = load_tokenizer(args.source)
    text = sys.stdin.read() if args.text == "-" else args.text
    enc = tok.encode_with_offsets(
        text, add_special_tokens=not args.no_special, allowed_special=_allowed_special(args.allowed_special)
    )
    if args.json:
        print(json.dumps({"ids": enc.ids, "tokens": enc.tokens, "offsets": enc.offsets}, ensure_ascii=False))
        return 0
    if sys.stdout.isatty():
        print(_coloured(text, enc.offsets))
    for token_id, token in zip(enc.ids, enc.tokens):
        print(f"{token_id:>8}  {token!r}")
    print(f"{len(enc.ids)} tokens")
    return 0


def _coloured(text: str, offsets: list[tuple[int, int]]) -> str:
    """``text`` with each token's span on its own background colour."""
    parts, end, n = [], 0, 0
    for start, stop in offsets:
        if stop <= end:  # added tokens (0, 0), or the second half of a character split in two
            continue
        if start > end:
            parts.append(text[end:start])  # text no token covers (BERT drops whitespace)
        parts.append(f"{_COLOURS[n % len(_COLOURS)]}{text[max(start, end) : stop]}{_RESET}")
        end, n = stop, n + 1
    return "".join(parts) + text[end:]


def run_decode(args: argparse.Namespace) -> int:
    from qkv.tokenizer import load_tokenizer

    print(load_tokenizer(args.source).decode(args.ids, skip_special_tokens=args.skip_special))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from qkv.tokenizer import load_tokenizer

    tok = load_tokenizer(args.source)
    info = {
        "kind": tok.kind,
        "format": tok.source_format,
        "vocab_size": tok.vocab_size,
        "special_tokens": {role: [t, tok.token_to_id(t)] for role, t in tok.special_tokens.items()},
        "all_special_tokens": sorted(tok.all_special_tokens),
        "special_tokens_in_text": "none" if tok.split_special_tokens else "all",
        "chat_template": tok.chat_template is not None,
    }
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return 0
    print(f"kind:            {info['kind']} ({info['format']})")
    print(f"vocab size:      {info['vocab_size']}")
    for role, (token, token_id) in info["special_tokens"].items():
        print(f"{role + ':':<17}{token!r} ({token_id})")
    others = len(info["all_special_tokens"])
    print(f"special tokens:  {others} (recognised in text by default: {info['special_tokens_in_text']})")
    print(f"chat template:   {'yes' if info['chat_template'] else 'no'}")
    return 0
