"""`qkv generate MODEL --prompt TEXT`: continue a prompt (flag names follow llama.cpp/transformers)."""

from __future__ import annotations

import argparse
import json
import sys

from qkv.cli.args import add_model_argument, non_negative_float, non_negative_int, positive_int, probability


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Decoding flags shared by `generate` and `chat`."""
    p.add_argument("--max-new-tokens", "-n", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=non_negative_int, default=None)
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--min-p", type=probability, default=None)
    p.add_argument("--typical-p", type=probability, default=None)
    p.add_argument("--repetition-penalty", type=non_negative_float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--compile", action="store_true", help="decode through a compiled static step (~30 s to compile)")


def sampling_options(args: argparse.Namespace) -> dict:
    """The keyword options of `qkv.generation.text.stream_completion` from parsed flags."""
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise ValueError("--repetition-penalty must be > 0 (1 disables it)")
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, typical_p=args.typical_p, repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty, seed=args.seed,
        stop=args.stop, compile=args.compile,
    )  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt", description=__doc__)
    add_model_argument(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    add_sampling_arguments(p)
    p.add_argument("--num-beams", type=positive_int, default=1, help="beam search width (1 = no beam search)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--logprobs", type=non_negative_int, default=0, metavar="N", help="report top-N log-probs")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print text as it is generated")
    out.add_argument("--json", action="store_true", help="print text, ids, finish reason and timings as JSON")
    p.set_defaults(func=run)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise ValueError(f"--prompt-file {args.prompt_file}: {exc.strerror}") from None
    return args.prompt


def encode_checked(args: argparse.Namespace, model, tok, prompt: str, add_special: bool) -> list[int]:
    """The prompt's ids; a ValueError naming the flag when it is empty or does not fit the context."""
    from qkv.generation.decode import context_budget
    from qkv.generation.text import encode_prompt

    try:
        ids = encode_prompt(tok, prompt, add_special)
        context_budget(model, len(ids), args.max_new_tokens)
    except ValueError as exc:
        flag = f"--prompt-file {args.prompt_file}" if args.prompt_file else "--prompt"
        raise ValueError(f"{flag}: {exc}") from None
    return ids


def run(args: argparse.Namespace) -> int:
    from qkv.generation.text import stream_completion
    from qkv.load import load

    prompt = read_prompt(args)
    model = load(args.model, dtype=args.dtype)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{args.model} carries no tokenizer, so a text prompt cannot be encoded")
    add_special = True
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt, add_special = tok.apply_chat_template(messages, add_generation_prompt=True), False
    options = sampling_options(args)
    ids = encode_checked(args, model, tok, prompt, add_special)
    if args.num_beams > 1:
        return _run_beam(args, model, tok, ids, options)
    result = None
    for item in stream_completion(
        model, tok, ids, top_logprobs=args.logprobs, logprobs=bool(args.logprobs), **options
    ):  # fmt: skip
        if isinstance(item, str):
            if args.stream:
                sys.stdout.write(item)
                sys.stdout.flush()
        else:
            result = item
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
    elif args.stream:
        sys.stdout.write("\n")
    else:
        print(result.text)
    return 0


def _run_beam(args, model, tok, ids, options) -> int:
    import torch

    # `is not None`, not `or`: id 0 is a valid EOS (GPT-2-style trained tokenizers put it there).
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=options["max_new_tokens"], num_beams=args.num_beams, eos_token_id=eos,
    )  # fmt: skip
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    new = out[0, len(ids) :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in eos_ids), len(new))]  # EOS and the padding after it
    text = tok.decode(new, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"text": text, "token_ids": new, "num_beams": args.num_beams}, ensure_ascii=False))
    else:
        print(text)
    return 0
