"""Continuous batching: 16 concurrent greedy streams through `qkv.serve.Engine` vs the same 16
one at a time through `generate()`, on SmolLM2-135M-Instruct's Q4_1 GGUF (packed, compiled step).

    python benchmarks/serve_engine.py [--streams 16] [--tokens 64] [--max-context 512] [--repeats 2]
                                      [--threads N]

Each side is warmed up first (the compiled steps are built, or loaded from the compile cache,
before the clock starts), then timed --repeats times, best run kept (the prefix cache is off, so
a repeat runs every prompt again). Every stream is a different chat prompt and generates until EOS or
--tokens; both sides generate the same tokens (greedy; checked), so aggregate tok/s = all
generated tokens / wall time. Prints both, and the ratio engine / one at a time, and how many
streams gave generate()'s tokens exactly: in bfloat16 a batch of 16 rounds differently from a
batch of 1 (other kernels, another summation order), so a near-tied greedy pick can go the other
way and the stream continues differently from there (in float32 they match: tests/serve).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
    "List three prime numbers.", "Who wrote Hamlet?", "Describe a cat in one sentence.",
    "What is 12 times 7?", "Give a tip for learning Python.", "Why is the sky blue?",
    "Name a famous painting.", "What does a compiler do?", "Suggest a name for a dog.",
    "How many legs does a spider have?", "What is the boiling point of water?",
    "Translate 'good morning' to Spanish.", "Tell me a fun fact about space.",
]  # fmt: skip


def main() -> int:
    import torch

    import qkv
    from qkv.bench import gguf_file
    from qkv.generation import generate
    from qkv.generation.options import GenerationConfig
    from qkv.hub import pull
    from qkv.serve import Engine, EngineOptions, Request, TokenEvent
    from qkv.threads import in_own_thread
    from qkv.tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="max new tokens per stream")
    p.add_argument("--max-context", type=int, default=512, help="the engine's slot length")
    p.add_argument("--repeats", type=int, default=2, help="each side's time is the best of this many runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = gguf_file(pull("smollm2-135m-instruct"))
    # Both sides compute on threads of their own (the engine on its scheduler thread, generate() on
    # the thread below) and the model loads on one too: the main thread then holds no OpenMP team,
    # which would slow every other thread's parallel regions (benchmarks/omp_threads.py).
    model, tok = in_own_thread(lambda: (qkv.load(path), load_tokenizer(path)))
    questions = [QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS)) for i in range(args.streams)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in questions]
    print(f"SmolLM2-135M-Instruct {path.name}; {args.streams} streams of up to {args.tokens} greedy tokens; "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip

    def one_at_a_time() -> tuple[float, list[list[int]]]:
        for ids in prompts:  # warm-up: the compiled batch-1 step, built or loaded once
            generate(model, torch.tensor([ids]), max_new_tokens=2)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            alone = []
            for ids in prompts:
                out = generate(model, torch.tensor([ids]), max_new_tokens=args.tokens)[0, len(ids) :].tolist()
                eos = next((i for i, t in enumerate(out) if t == tok.eos_token_id), len(out))
                alone.append(out[:eos])
            best = min(best, time.perf_counter() - start)
        return best, alone

    one_by_one, alone = in_own_thread(one_at_a_time)

    options = EngineOptions(max_batch=args.streams, max_context=args.max_context, prefix_cache_tokens=0)
    engine = Engine(model, tok, options)
    in_own_thread(engine.warmup)  # the compiled [streams, 1] step
    engine.start()
    try:
        config = GenerationConfig(max_new_tokens=args.tokens)
        results: list[list[int]] = [[] for _ in prompts]

        def consume(i: int, handle) -> None:
            results[i] = [e.token_id for e in handle.events() if isinstance(e, TokenEvent)]

        batched = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            handles = [engine.submit(Request(ids, config)) for ids in prompts]
            threads = [threading.Thread(target=consume, args=(i, h)) for i, h in enumerate(handles)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            batched = min(batched, time.perf_counter() - start)
        stats = engine.stats()
        steps, ttft = sorted(stats.step_seconds), sorted(stats.ttft_seconds)
    finally:
        engine.stop()
    n = sum(len(r) for r in alone)
    same = sum(a == b for a, b in zip(alone, results))
    print(f"one at a time (generate):   {n} tokens in {one_by_one:6.2f} s = {n / one_by_one:7.1f} tok/s")
    m = sum(len(r) for r in results)
    print(f"engine ({args.streams} concurrent):     {m} tokens in {batched:6.2f} s = {m / batched:7.1f} tok/s")
    print(f"ratio engine / one at a time: {(m / batched) / (n / one_by_one):.2f}x; "
          f"median decode step {steps[len(steps) // 2] * 1e3:.1f} ms; "
          f"time to first token median {ttft[len(ttft) // 2]:.2f} s, max {ttft[-1]:.2f} s; "
          f"streams with generate()'s tokens: {same}/{len(prompts)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
