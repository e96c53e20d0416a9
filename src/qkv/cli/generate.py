"""`qkv generate MODEL --prompt TEXT`: continue a prompt (flag names follow llama.cpp/transformers)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from qkv.cli.args import (
    add_model_argument,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from qkv.errors import UsageError
from qkv.generation.context import DEFAULT_FACTOR, RopeScaling
from qkv.generation.options import GenerationConfig


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Decoding flags shared by `generate` and `chat`."""
    p.add_argument("--max-new-tokens", "-n", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=non_negative_int, default=None)
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--min-p", type=probability, default=None)
    p.add_argument("--typical-p", type=probability, default=None)
    p.add_argument("--repetition-penalty", type=positive_float, default=None, help="1 disables it")
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--dequantize", action="store_true", help="load a GGUF file's weights dense (default: kept packed)")
    p.add_argument("--quantize", choices=("int4", "int8"), default=None, help="quantize a dense model's linear layers")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through a compiled static step (default: for packed quantized models; "
                        "the first compile takes ~40 s and is cached under $QKV_HOME/compile)")  # fmt: skip


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The one `GenerationConfig` that the decoding flags describe: each flag's destination is the
    field's own name, so no option list is written out here."""
    fields = {f.name for f in dataclasses.fields(GenerationConfig)} & set(vars(args))
    options = {name: getattr(args, name) for name in fields}
    options["stop"] = tuple(options.get("stop", ()))
    if options.get("top_logprobs"):
        options["logprobs"] = True
    return GenerationConfig(**options)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt", description=__doc__)
    add_model_argument(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    add_sampling_arguments(p)
    p.add_argument("--num-beams", type=positive_int, default=1, help="beam search width (1 = no beam search)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log p / length^this")
    p.add_argument(
        "--prefill-chunk", type=positive_int, default=GenerationConfig.prefill_chunk, metavar="N",
        help="feed the prompt N tokens per forward, so a long prompt's memory grows with N (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--rope-scaling", type=rope_scaling_argument, default=None, metavar="KIND[:FACTOR]",
        help="run a RoPE model past its trained context: linear, dynamic (NTK) or yarn, with the factor the "
             f"context grows by (default {DEFAULT_FACTOR:g}), e.g. yarn:4",
    )  # fmt: skip
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument(
        "--json-schema", type=json_schema_argument, default=None, metavar="FILE|JSON",
        help='constrain the output to JSON valid under this JSON Schema (a file, or the schema itself); '
             '\'{"type": "object"}\' allows any object. Needs llguidance (pip install \'qkv[json]\')',
    )  # fmt: skip
    p.add_argument(
        "--logprobs", dest="top_logprobs", type=non_negative_int, default=0, metavar="N", help="report top-N log-probs"
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print text as it is generated")
    out.add_argument("--json", action="store_true", help="print text, ids, finish reason and timings as JSON")
    p.set_defaults(func=run)


def json_schema_argument(value: str) -> str:
    """--json-schema: the schema's JSON text, given inline (it starts with '{') or as a file path.
    GenerationConfig parses and checks it, so a bad schema is refused before the model loads."""
    if value.lstrip().startswith("{"):
        return value
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"{value}: {exc.strerror} (give a schema file or the schema as JSON)"
        ) from None


def rope_scaling_argument(value: str) -> RopeScaling:
    """--rope-scaling KIND[:FACTOR], checked before the model loads."""
    try:
        return RopeScaling.parse(value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise UsageError(f"--prompt-file {args.prompt_file}: {exc.strerror}") from None
    return args.prompt


def encode_checked(args: argparse.Namespace, model, tok, prompt: str, add_special: bool) -> list[int]:
    """The prompt's ids; an error naming the flag when it is empty or does not fit the context."""
    from qkv.generation.decode import generation_budget
    from qkv.generation.text import encode_prompt

    try:
        ids = encode_prompt(tok, prompt, add_special)
        generation_budget(model, len(ids), args.max_new_tokens)
    except UsageError as exc:
        flag = f"--prompt-file {args.prompt_file}" if args.prompt_file else "--prompt"
        raise UsageError(f"{flag}: {exc}") from None
    return ids


def run(args: argparse.Namespace) -> int:
    from qkv.generation.context import scale_rope
    from qkv.generation.text import complete, stream_completion
    from qkv.loading import load

    prompt = read_prompt(args)
    config = generation_config(args)
    beams = config.num_beams > 1
    if beams and args.stream:
        raise UsageError("--stream cannot be used with --num-beams: beam search knows its text only at the end")
    if beams and args.compile:
        raise UsageError("--compile applies to greedy and sampled decoding, not to --num-beams")
    if beams:
        config.check_supported("beam")  # refuse what beams cannot do before loading the model
    model = load(args.model, dtype=args.dtype, quantize=args.quantize, dequantize=args.dequantize)
    if args.rope_scaling is not None:
        try:
            scale_rope(model, args.rope_scaling)
        except UsageError as exc:
            raise UsageError(f"--rope-scaling: {args.model}: {exc}") from None
    tok = model.tokenizer
    if tok is None:
        raise UsageError(f"{args.model} carries no tokenizer, so a text prompt cannot be encoded")
    add_special = True
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt, add_special = tok.apply_chat_template(messages, add_generation_prompt=True), False
    ids = encode_checked(args, model, tok, prompt, add_special)
    if beams:
        result = complete(model, tok, ids, config)
    else:
        result = None
        for item in stream_completion(model, tok, ids, config, compile=args.compile):
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
