"""`qkv embed MODEL TEXT... | --file FILE`: sentence embeddings, as JSON lines or a file.

MODEL is an encoder: a known name (`qkv models`), a sentence-transformers or Hugging Face
directory, or a qkv checkpoint. Pooling, normalisation and length come from the model's
sentence-transformers files (modules.json, 1_Pooling/config.json, sentence_bert_config.json);
the flags override them.

  qkv embed all-minilm-l6-v2 "A cat sits on the mat." "A dog plays in the park."
  qkv embed all-minilm-l6-v2 --file sentences.txt --out vectors.npy      (or --out vectors.jsonl)
"""

from __future__ import annotations

import argparse
import sys

from torch import nn

from qkv.cli.args import add_model_argument, positive_int
from qkv.embedding import embed, load_sentence_model
from qkv.embedding.config import POOLING_MODES
from qkv.embedding.files import check_output_path, json_lines, read_lines, save_embeddings
from qkv.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="sentence embeddings of texts (JSON lines, .npy or .jsonl)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_model_argument(p)
    add_text_arguments(p)
    p.add_argument("--out", metavar="PATH", help="write to PATH.npy (float32 [N, D]) or PATH.jsonl instead of stdout")
    add_embedding_arguments(p)
    p.set_defaults(func=run)


def add_text_arguments(p: argparse.ArgumentParser) -> None:
    """TEXT positionals, or --file with one text per line."""
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed")
    p.add_argument("--file", metavar="FILE", help="read the texts from FILE, one per line (- for standard input)")


def add_embedding_arguments(p: argparse.ArgumentParser) -> None:
    """Options every embedding command shares: batch size, dtype and the model-setting overrides."""
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the checkpoint's, float32); bfloat16 is faster on CPUs with "
                        "bf16 instructions, cosine ~0.9999 to float32")  # fmt: skip
    p.add_argument("--pooling", choices=POOLING_MODES, default=None, help="override the model's pooling")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="override whether rows are scaled to unit length")  # fmt: skip
    p.add_argument("--max-length", type=positive_int, default=None, help="override the tokens kept per text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def gather_texts(args: argparse.Namespace) -> list[str]:
    """The TEXT arguments or the lines of --file (one of the two)."""
    if args.file is not None and args.texts:
        raise UsageError("give texts as arguments or with --file, not both")
    if args.file is not None:
        return read_lines(args.file)
    if not args.texts:
        raise UsageError("no texts: give them as arguments or with --file FILE (one per line)")
    return list(args.texts)


def load_model(args: argparse.Namespace) -> nn.Module:
    """The MODEL argument loaded for embedding, in --dtype, with its sentence-transformers settings."""
    return load_sentence_model(args.model, dtype=args.dtype)


def embed_options(args: argparse.Namespace) -> dict:
    """`embed` keyword arguments from the shared options."""
    return dict(
        batch_size=args.batch_size, pooling=args.pooling, normalize=args.normalize, max_length=args.max_length,
        progress=False if args.quiet else None,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_output_path(args.out)  # before the work, not after
    texts = gather_texts(args)
    model = load_model(args)
    vectors = embed(model, model.tokenizer, texts, **embed_options(args))
    if args.out is None:
        for line in json_lines(texts, vectors):
            print(line)
        return 0
    save_embeddings(args.out, vectors, texts)
    print(f"{vectors.shape[0]} embeddings of size {vectors.shape[1]} written to {args.out}", file=sys.stderr)
    return 0
