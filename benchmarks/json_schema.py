"""The per-token cost of constrained decoding (`json_schema=`) on SmolLM2-135M-Instruct.

Greedy, --tokens new tokens (default 64) after the same chat prompt, without and with a JSON
Schema; the schema asks for more than the budget holds (ten people), so the constrained run
decodes all 64 tokens too (the free run does as well: it writes longer JSON). Each is timed
--repeats times, alternately (a busy machine slows both alike), for 1 and for N tokens; the best
of each gives the decode cost per token, (t_N - t_1) / (N - 1), with the prefill cancelled out.
The constrained run also reports the time spent inside the processor per step: feeding each
row's matcher its chosen token, computing the batch's masks and applying them to the logits.

    python benchmarks/json_schema.py [--tokens 64] [--batch 1] [--repeats 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import qkv
from qkv.generation import constrained, generate

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PEOPLE = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": PERSON, "minItems": 10}},
    "required": ["people"],
    "additionalProperties": False,
}
ASK = "Give me a JSON object with a list of ten people, each with a name and an age."


class ProcessorClock:
    """Adds up the time spent in JsonSchemaProcessor.__call__ (patched while the clock is in use)."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self._original = constrained.JsonSchemaProcessor.__call__

    def __enter__(self) -> ProcessorClock:
        original = self._original

        def timed(processor, logits, input_ids):
            start = time.perf_counter()
            out = original(processor, logits, input_ids)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        constrained.JsonSchemaProcessor.__call__ = timed
        return self

    def __exit__(self, *exc) -> None:
        constrained.JsonSchemaProcessor.__call__ = self._original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (each with its own matcher)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode through the compiled step (default: qkv's choice: compiled here)")  # fmt: skip
    args = parser.parse_args()

    model = qkv.load("smollm2-135m-instruct")
    tok = model.tokenizer
    prompt = torch.tensor([tok.apply_chat_template([{"role": "user", "content": ASK}], tokenize=True)])
    runs = {"free": None, "json_schema": PEOPLE}

    def run(schema, n):
        return generate(model, prompt, n, json_schema=schema, num_return_sequences=args.batch, compile=args.compile)

    for schema in runs.values():  # warm-up: compiles the step, builds the grammar's tokenizer
        run(schema, args.tokens)
    # The decode cost per step is (time for N tokens - time for 1) / (N - 1): the prefill cancels.
    best = {(name, n): float("inf") for name in runs for n in (1, args.tokens)}
    mask = float("inf")
    for _ in range(args.repeats):
        for name, schema in runs.items():
            for n in (1, args.tokens):
                with ProcessorClock() as clock:
                    start = time.perf_counter()
                    out = run(schema, n)
                    best[name, n] = min(best[name, n], time.perf_counter() - start)
                assert out.shape[1] == prompt.shape[1] + n, f"{name} ended before {n} tokens"
                if schema is not None and n == args.tokens:
                    mask = min(mask, clock.seconds / clock.calls)
    step = {name: (best[name, args.tokens] - best[name, 1]) / (args.tokens - 1) for name in runs}
    text = tok.decode(out[0, prompt.shape[1] :])
    print(f"SmolLM2-135M-Instruct, greedy, {args.tokens} new tokens, batch {args.batch}, "
          f"threads {torch.get_num_threads()}, compile={args.compile}, best of {args.repeats}")  # fmt: skip
    print(f"  free text:    {1000 * step['free']:.2f} ms/token")
    print(f"  json_schema:  {1000 * step['json_schema']:.2f} ms/token, of which the processor {1000 * mask:.2f} ms")
    print(f"  ratio json_schema / free: {step['json_schema'] / step['free']:.2f}x")
    print(f"  constrained text starts: {json.dumps(text[:80])}")


if __name__ == "__main__":
    main()
