"""Speculative decoding speed: a target alone (greedy) vs the target verifying a draft's proposals.

Nothing is trained. The target is a tiny-llama-shaped model with random weights and more layers;
the draft is its first layers with the same embeddings, final norm and head (`early_exit_draft`),
they share everything but the last layers. Both runs must produce the same tokens; the script
prints tokens/s of each, the acceptance rate and the speed-up.

With random weights every layer rewrites the residual stream as much as the first ones, so the
draft rarely agrees with the target (about 1% acceptance): the honest floor. `--late-layer-scale s`
multiplies the output projections of the layers the draft skips by s; s=0 leaves them computed but
inert, so the draft always agrees: the ceiling for this draft/target cost ratio. (Values between
give erratic acceptance on random weights: greedy output falls into short cycles that the draft
joins or not.) The two contenders are timed alternately, best of --repeats, so a busy machine
slows both alike.

    python benchmarks/speculative.py [--layers 8] [--draft-layers 2] [--d-model 256] [--tokens 128]
                                     [-k 4] [--late-layer-scale 1.0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from qkv import DecoderLM, ModelConfig
from qkv.generation import generate
from qkv.generation.speculative import speculative_generate
from qkv.models.decoder import early_exit_draft


def best_times(
    contenders: dict[str, Callable[[], torch.Tensor]], repeats: int
) -> dict[str, tuple[float, torch.Tensor]]:
    """Fastest of `repeats` runs of each contender (after one warm-up), run alternately, with a progress line."""
    outputs = {name: fn() for name, fn in contenders.items()}
    best = dict.fromkeys(contenders, float("inf"))
    for i in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
        shown = ", ".join(f"{name} {t:.3f}s" for name, t in best.items())
        print(f"\rrun {i + 1}/{repeats}: best {shown}", end="", flush=True)
    print()
    return {name: (best[name], outputs[name]) for name in contenders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("-k", "--num-draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--late-layer-scale", type=float, default=1.0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_name(
        "tiny-llama", n_layers=args.layers, d_model=args.d_model, n_heads=args.d_model // 32,
        n_kv_heads=args.d_model // 64, d_ff=None if args.d_model != 256 else 688, vocab_size=args.vocab,
        max_seq_len=args.prompt + args.tokens,
    )  # fmt: skip
    target = DecoderLM(cfg).eval()
    with torch.no_grad():
        for block in target.blocks[args.draft_layers :]:
            block.attn.o_proj.weight.mul_(args.late_layer_scale)
            block.mlp.down.weight.mul_(args.late_layer_scale)
    draft = early_exit_draft(target, args.draft_layers)
    ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    print(
        f"target: {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}; draft: first {args.draft_layers} "
        f"layers; late-layer scale {args.late_layer_scale}; {args.tokens} new tokens, k={args.num_draft_tokens}, "
        f"{torch.get_num_threads()} threads"
    )

    stats = None

    def speculative() -> torch.Tensor:
        nonlocal stats
        out, stats = speculative_generate(
            target, draft, ids, args.tokens, num_draft_tokens=args.num_draft_tokens, eos_token_id=[]
        )
        return out

    times = best_times(
        {"target alone": lambda: generate(target, ids, args.tokens, eos_token_id=[]), "speculative": speculative},
        args.repeats,
    )
    (plain_s, plain), (spec_s, spec) = times["target alone"], times["speculative"]
    if not torch.equal(plain, spec):
        raise SystemExit("speculative output differs from the target's greedy output")
    n = plain.shape[1] - ids.shape[1]
    print(f"target alone : {n / plain_s:8.1f} tokens/s")
    print(
        f"speculative  : {n / spec_s:8.1f} tokens/s  (acceptance {stats.acceptance_rate:.1%}, "
        f"{stats.target_forwards} target forwards for {n} tokens)"
    )
    print(f"speed-up     : {plain_s / spec_s:.2f}x")


if __name__ == "__main__":
    main()
