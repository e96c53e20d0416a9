"""`qkv finetune MODEL --task classification|instruct --steps N`: fine-tune a pre-trained model.

--task classification: MODEL is a pre-trained encoder (a known name such as all-minilm-l6-v2, an
HF directory, or a qkv checkpoint, e.g. one `qkv train --objective mlm|rtd` wrote); a
classification head for the data's labels is put on its body. --data FILE holds one labelled
example per line:

  *.tsv, *.txt   LABEL<TAB>TEXT          (the label first, so the text may hold tabs)
  *.jsonl        {"text": "...", "label": "..."}

--val FILE (same format) is the held-out set; without it a seeded --val-fraction of FILE is held
out. The run directory (--out) gets metrics.jsonl (eval accuracy included), loss_curve.png and
checkpoint/, which `qkv classify` and `qkv.load` read; the label names are saved in its
config.json (config.extra.labels).

--task instruct: MODEL is a chat model (e.g. smollm2-135m-instruct), trained on chats qkv makes
from the Python standard library: "Explain what this Python function does:" + a short function's
source -> the first paragraph of its docstring, split by module. The chats are rendered with the
model's chat template (--chat-template chatml for a model without one) and the loss covers only
the assistant's tokens. It prints the held-out loss before and after, and a held-out function's
answer before and after; checkpoint/ holds the tuned model, or with --lora, adapter/ holds a
PEFT-format adapter (adapter_config.json + adapter_model.safetensors). A chat model's evaluation
and checkpoint are costly, so by default they happen after the last step only (--eval-every and
--save-every set them). --grad-checkpoint saves memory; --bf16 is much faster where the CPU
computes in bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from qkv.cli.args import non_negative_float, positive_int, probability
from qkv.cli.train import add_training_arguments, summary, training_config
from qkv.errors import UsageError
from qkv.training.classification import label_names_of, read_labelled
from qkv.training.finetune import TASKS, finetune

# Per-task defaults of the shared training flags (None in the parser, so a given value is told apart).
DEFAULTS = {
    "classification": {"batch_size": 16, "lr": 5e-5, "max_len": 128},
    "instruct": {"batch_size": 4, "lr": 5e-5, "max_len": 384},
}
LORA_LR = 5e-4  # the default with --lora: adapters start at zero and need a larger step
LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune an encoder on labelled texts, or a chat model on instructions",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model (or give --model)")
    p.add_argument("--task", choices=(*TASKS, "instruct"), required=True, help="what to fine-tune for")
    p.add_argument("--model", default=None, help="the model: known name, HF directory or qkv checkpoint")
    p.add_argument("--data", default=None, metavar="FILE", help="classification: examples (.tsv or .jsonl)")
    p.add_argument("--val", default=None, metavar="FILE", help="classification: held-out examples, same format")
    p.add_argument("--val-fraction", type=non_negative_float, default=0.1, help="held out of --data without --val")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="tokens per example: classification cuts longer texts (default 128); instruct leaves "
                        "longer chats out (default 384)")  # fmt: skip
    add_training_arguments(p, out_default="runs/finetune-<model>", batch_size=16, lr=5e-5, weight_decay=0.01)
    for action in p._actions:  # per-task defaults: see DEFAULTS
        if action.dest == "batch_size":
            action.default, action.help = None, "default: 16 (classification), 4 (instruct)"
        elif action.dest == "lr":
            action.default, action.help = None, f"peak learning rate (default: 5e-5; {LORA_LR:g} with --lora)"
    instruct = p.add_argument_group("instruct")
    instruct.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                          help="a built-in template (chatml) or a Jinja file, for a model without its own")  # fmt: skip
    instruct.add_argument("--train-examples", type=positive_int, default=512, help="chats to train on (512)")
    instruct.add_argument("--test-examples", type=positive_int, default=32, help="held-out chats (32)")
    instruct.add_argument("--sample-tokens", type=positive_int, default=64, help="length of the sample answers")
    instruct.add_argument("--lora", action="store_true", help="train LoRA adapters on the frozen model")
    instruct.add_argument("--lora-rank", type=positive_int, default=None, help="adapter rank r (default 8)")
    instruct.add_argument("--lora-alpha", type=non_negative_float, default=None, help="scaling alpha (default 16)")
    instruct.add_argument("--lora-dropout", type=probability, default=None, help="dropout on the adapter input")
    instruct.add_argument("--lora-targets", nargs="+", default=None, metavar="PATTERN",
                          help="layers to adapt: roles (q k v o gate up down), names or globs "
                               "(default: q k v o)")  # fmt: skip
    p.set_defaults(func=run)


def model_source(args: argparse.Namespace) -> str:
    """MODEL, given as the positional or as --model (not both)."""
    if args.model_arg and args.model and args.model_arg != args.model:
        raise UsageError(f"two models given ({args.model_arg!r} and --model {args.model!r}); give one")
    model = args.model_arg or args.model
    if not model:
        raise UsageError("give the model to fine-tune: qkv finetune MODEL --task ... (or --model MODEL)")
    return model


def _task_defaults(args: argparse.Namespace) -> None:
    """Fill the flags left unset with the task's defaults; refuse flags the task does not use."""
    given_lora = [f"--{f.replace('_', '-')}" for f in LORA_FLAGS if getattr(args, f) is not None]
    if given_lora and not args.lora:
        raise UsageError(f"{', '.join(given_lora)} configure LoRA; add --lora to train adapters")
    if args.task == "classification":
        if args.data is None:
            raise UsageError("--task classification needs --data FILE (labelled examples)")
        if args.lora:
            raise UsageError("--lora is available for --task instruct; classification trains the whole encoder")
    else:
        unused = [flag for flag, value in (("--data", args.data), ("--val", args.val)) if value is not None]
        if unused:
            raise UsageError(f"--task instruct makes its own chats from the standard library; drop {', '.join(unused)}")
    for name, value in DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, LORA_LR if name == "lr" and args.lora else value)


def run(args: argparse.Namespace) -> int:
    model = model_source(args)
    _task_defaults(args)
    out = Path(args.out or Path("runs") / f"finetune-{Path(model).name}")
    if args.task == "instruct":
        return _instruct(args, model, out)
    val = read_labelled(args.val) if args.val else None
    trainer = finetune(
        model, read_labelled(args.data), training_config(args, out), val=val, val_fraction=args.val_fraction,
        max_len=args.max_len, batch_size=args.batch_size, seed=args.seed, resume=args.resume,
    )  # fmt: skip
    print(f"labels: {', '.join(label_names_of(trainer.model))}")
    print(summary(trainer, out))
    return 0


def _instruct(args: argparse.Namespace, model: str, out: Path) -> int:
    """`--task instruct`: `qkv.training.instruct.instruct_finetune`, and what it reports."""
    from qkv.training.instruct import InstructTask, instruct_finetune

    config = training_config(args, out)
    # A chat model's evaluation and checkpoint are costly: by default only after the last step.
    config = dataclasses.replace(
        config, eval_every=args.eval_every or 0, save_every=args.save_every or 0
    )  # fmt: skip
    template = args.chat_template
    if template is not None and Path(template).is_file():
        template = Path(template).read_text(encoding="utf-8")
    lora = None
    if args.lora:
        from qkv.nn.lora import LoraConfig

        options = {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                   "targets": tuple(args.lora_targets) if args.lora_targets else None}  # fmt: skip
        lora = LoraConfig(**{k: v for k, v in options.items() if v is not None})
    task = InstructTask(n_train=args.train_examples, n_test=args.test_examples, seed=args.seed)
    result = instruct_finetune(
        model, config, task=task, max_len=args.max_len, batch_size=args.batch_size, chat_template=template,
        sample_tokens=args.sample_tokens, resume=args.resume, lora=lora,
    )  # fmt: skip
    left_out = f" ({result.dropped} longer than --max-len {args.max_len} left out)" if result.dropped else ""
    print(f"chats: {result.n_train} training, {result.n_test} held out{left_out}")
    print(f"held-out loss (assistant tokens): {result.loss_before:.4f} before, {result.loss_after:.4f} after")
    s = result.sample
    print(f"sample ({s.origin}):\n{s.prompt}\n  reference: {s.reference}\n  before:    {s.answer_before}\n"
          f"  after:     {s.answer_after}")  # fmt: skip
    print(f"{'adapter' if args.lora else 'checkpoint'}: {result.saved}; metrics: {out / 'metrics.jsonl'}")
    return 0
