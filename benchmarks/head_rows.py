"""A tied output head by row count: the packed kernel vs its dense twin (the embedding table).

    python benchmarks/head_rows.py [MODEL]   (default: smollm2-135m-instruct, packed Q4_1 GGUF)

The head of a tied model loaded packed is group-wise int8 (`HEAD_SCHEME`), and the embedding
table beside it holds the same values dense in bfloat16. For 1 to 64 rows (a decode step's batch)
this prints the best-of-50 time of the head through the packed kernel and through the twin, and
their ratio; `TWIN_ROWS` in `qkv/nn/quant.py` is where the twin starts to win.
"""

from __future__ import annotations

import sys

import torch

import qkv
from qkv.bench import best_time
from qkv.nn import quant


def main() -> None:
    model = qkv.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct")
    head = model.lm_head
    if not (isinstance(head, quant.QuantLinear) and head._twin):
        raise SystemExit("this model's head is not packed with a dense twin (a tied head loaded packed is)")
    print(f"threads {torch.get_num_threads()}, head {head.out_features} x {head.in_features}; ms a call")
    print(f"{'rows':>5} {'packed':>8} {'twin':>8} {'ratio':>7}")
    saved = quant.TWIN_ROWS, quant.DENSE_ROWS
    with torch.no_grad():
        for rows in (1, 2, 4, 8, 16, 32, 64):
            x = torch.randn(rows, head.in_features).bfloat16()
            try:
                quant.TWIN_ROWS, quant.DENSE_ROWS = 1 << 30, 1 << 30  # the packed kernel at every row count
                packed = best_time(lambda x=x: head(x), 50) * 1e3
            finally:
                quant.TWIN_ROWS, quant.DENSE_ROWS = saved
            twin = best_time(lambda x=x: torch.nn.functional.linear(x, head._twin[0]), 50) * 1e3
            print(f"{rows:>5} {packed:>8.3f} {twin:>8.3f} {packed / twin:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
