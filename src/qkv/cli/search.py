"""`qkv search MODEL --corpus DIR QUERY...`: semantic search over your own text files.

Every line (or, with --files, every file) of the text files under DIR is embedded and ranked by
cosine similarity to each query. By default the files read are notes and docs (.txt .md
.markdown .rst .org .tex .adoc .text); --ext picks others. Hidden files and folders are left
out; binary and non-UTF-8 files are skipped with a note.

  qkv search all-minilm-l6-v2 --corpus ~/notes "when is the dentist appointment?"
  qkv search all-minilm-l6-v2 --corpus src/ --ext py --top-k 10 "open a file atomically"
  qkv search all-minilm-l6-v2 --corpus docs/ --files "installation on Windows" --json
"""

from __future__ import annotations

import argparse
import json
import sys

from qkv.cli.args import add_model_argument, positive_int
from qkv.cli.embed import add_embedding_arguments, embed_options, load_model
from qkv.embedding.search import DEFAULT_SUFFIXES, read_corpus, search
from qkv.errors import UsageError

SHOWN_SKIPS = 5  # skipped files named in the note; the rest are counted
TEXT_WIDTH = 160  # characters of a passage shown in the listing


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="semantic search over the text files of a folder", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_model_argument(p)
    p.add_argument("queries", nargs="+", metavar="QUERY", help="what to look for (several: one ranking each)")
    p.add_argument("--corpus", required=True, metavar="DIR", help="folder of text files (searched recursively)")
    p.add_argument("--top-k", type=positive_int, default=5, help="results per query (default 5)")
    p.add_argument("--files", action="store_true", help="rank whole files, not lines (each up to the model's length)")
    p.add_argument("--ext", action="append", default=None, metavar="EXT",
                   help=f"file endings to read, repeatable or comma-separated (default: "
                        f"{','.join(s.lstrip('.') for s in DEFAULT_SUFFIXES)}); 'all' reads every file")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object per query")
    add_embedding_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    suffixes = _suffixes(args.ext)
    model = load_model(args)  # a wrong model fails before a large folder is read
    corpus = read_corpus(args.corpus, by="file" if args.files else "line", suffixes=suffixes)
    skipped = ", ".join(f"{path} ({why})" for path, why in corpus.skipped[:SHOWN_SKIPS])
    if len(corpus.skipped) > SHOWN_SKIPS:
        skipped += f" and {len(corpus.skipped) - SHOWN_SKIPS} more"
    if not corpus.passages:
        kinds = "every file" if suffixes is None else "*" + ", *".join(suffixes)
        skipped = f"; skipped {skipped}" if skipped else ""
        raise UsageError(f"no text found under {args.corpus} (read {kinds}{skipped}); choose file types with --ext")
    if skipped:
        print(f"qkv search: skipped {len(corpus.skipped)} file(s): {skipped}", file=sys.stderr)
    if not args.quiet:
        files = len({p.path for p in corpus.passages})
        unit = "files" if args.files else f"lines from {files} files"
        print(f"qkv search: embedding {len(corpus.passages)} {unit}", file=sys.stderr)
    results = search(model, model.tokenizer, args.queries, corpus, top_k=args.top_k, **embed_options(args))
    for query, hits in zip(args.queries, results):
        if args.json:
            found = [{"score": round(s, 6), "path": str(p.path), "line": p.line, "text": p.text} for s, p in hits]
            print(json.dumps({"query": query, "results": found}, ensure_ascii=False))
            continue
        print(f"query: {query}")
        for score, passage in hits:
            text = " ".join(passage.text.split())
            text = text if len(text) <= TEXT_WIDTH else text[: TEXT_WIDTH - 1] + "…"
            print(f"  {score:6.3f}  {passage.where}  {text}")
    return 0


def _suffixes(ext: list[str] | None) -> tuple[str, ...] | None:
    """--ext values -> suffixes (None: every file)."""
    if ext is None:
        return DEFAULT_SUFFIXES
    parts = [p.strip() for value in ext for p in value.split(",") if p.strip()]
    if "all" in parts:
        return None
    if not parts:
        raise UsageError("--ext needs a file ending such as md or .txt (or 'all')")
    return tuple(p if p.startswith(".") else f".{p}" for p in parts)
