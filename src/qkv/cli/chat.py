"""`qkv chat MODEL`: a multi-turn chat in the terminal using the model's chat template.

Replies stream as they are generated. `/reset` forgets the conversation, `/exit` (or end of
input) quits, Ctrl-C stops the current reply but not the session. Input can come from a pipe,
one user message per line.
"""

from __future__ import annotations

import argparse
import sys

from qkv.cli.args import add_model_argument
from qkv.cli.generate import add_sampling_arguments, generation_config
from qkv.errors import QkvError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat with a model", description=__doc__)
    add_model_argument(p)
    p.add_argument("--system", default=None, help="system message")
    add_sampling_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkv.generation.text import stream_completion
    from qkv.loading import load

    model = load(args.model, dtype=args.dtype, quantize=args.quantize, dequantize=args.dequantize)
    tok = model.tokenizer
    if tok is None:
        raise UsageError(f"{args.model} carries no tokenizer; chat needs one")
    if getattr(tok, "chat_template", None) is None:  # say so before reading any input
        raise UsageError(
            f"{args.model} has no chat template (none in its tokenizer_config.json or GGUF metadata); "
            "add a chat_template there, or use `qkv generate` to continue plain text"
        )
    config = generation_config(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if interactive:
        print("qkv chat — /reset to start over, /exit to quit, Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if not line:
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            print("(conversation reset)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        reply = []
        try:
            for item in stream_completion(model, tok, prompt, config, add_special_tokens=False, compile=args.compile):
                if isinstance(item, str):
                    reply.append(item)
                    sys.stdout.write(item)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except QkvError as exc:  # e.g. the conversation no longer fits the context: keep the session
            messages.pop()
            print(f"qkv chat: {exc} (message dropped; /reset starts a new conversation)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
