"""`qkv similarity MODEL TEXT TEXT...`: the cosine similarity of every pair of texts, as a table.

qkv similarity all-minilm-l6-v2 "A man is eating food." "A man eats pasta." "The sky is blue."
qkv similarity all-minilm-l6-v2 --file sentences.txt --json
"""

from __future__ import annotations

import argparse
import json

from qkv.cli.args import add_model_argument
from qkv.cli.embed import add_embedding_arguments, add_text_arguments, embed_options, gather_texts, load_model
from qkv.embedding import embed
from qkv.embedding.search import cosine_matrix
from qkv.errors import UsageError

LABEL_WIDTH = 32  # characters of each text shown as its row label


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("similarity", help="cosine similarity matrix of texts", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_model_argument(p)
    add_text_arguments(p)
    p.add_argument("--json", action="store_true", help='print {"texts": [...], "matrix": [[...]]}')
    add_embedding_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    texts = gather_texts(args)
    if len(texts) < 2:
        raise UsageError("give at least two texts to compare")
    model = load_model(args)
    matrix = cosine_matrix(embed(model, model.tokenizer, texts, **embed_options(args)))
    if args.json:
        print(json.dumps({"texts": texts, "matrix": [[round(v, 6) for v in row] for row in matrix.tolist()]}))
    else:
        print(format_table(texts, matrix.tolist()))
    return 0


def format_table(texts: list[str], matrix: list[list[float]]) -> str:
    """Rows labelled "[i] text…", columns "[i]", cosines to three decimals."""
    labels = [f"[{i + 1}] {_shorten(text)}" for i, text in enumerate(texts)]
    width = max(map(len, labels))
    cell = max(6, len(f"[{len(texts)}]"))
    lines = [" " * width + "".join(f"  {f'[{j + 1}]':>{cell}}" for j in range(len(texts)))]
    for label, row in zip(labels, matrix):
        lines.append(f"{label:<{width}}" + "".join(f"  {value:>{cell}.3f}" for value in row))
    return "\n".join(lines)


def _shorten(text: str) -> str:
    text = " ".join(text.split())  # one line, whatever the text held
    return text if len(text) <= LABEL_WIDTH else text[: LABEL_WIDTH - 1] + "…"
