"""Instruction fine-tuning of a chat model: what `qkv finetune MODEL --task instruct` runs.

    result = instruct_finetune("smollm2-135m-instruct", TrainingConfig(steps=20, lr=5e-5, out_dir="runs/it"))
    result.loss_before, result.loss_after   # mean held-out loss on the assistant tokens
    result.sample.answer_after              # the tuned model's answer to a held-out prompt

The data (`explain_function_task`) is made from the Python standard library on disk: each short
function with a docstring becomes one chat, "Explain what this Python function does:" + its source
with the docstring taken out -> the docstring's first paragraph. The split is by file (a seeded
hash of the path), so no module gives examples to both sides.

Each chat is rendered with the model's own chat template (SmolLM2's comes from its GGUF), and the
loss covers only the assistant's turn: the answer and the token that ends the turn (`chat_rows`,
`ChatCollate`); the system prompt, the user's turn and padding are labelled -100.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import random
import re
import textwrap
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkv.errors import UsageError
from qkv.nn.lora import LoraConfig, apply_lora
from qkv.training.pretrain import run_checkpoint, seed_everything
from qkv.training.stdlib_task import stdlib_root
from qkv.training.trainer import Trainer, TrainingConfig

SIGNATURE = re.compile(r"[\w.]+\(")  # a docstring that opens with a call signature: "S.pop([index]) -> item"
IGNORE = -100
ADAPTER_DIR = "adapter"  # a LoRA run's adapter, inside the run directory  # the label cross-entropy skips
PROMPT = "Explain what this Python function does:\n\n```python\n{source}\n```"
TEMPLATE_HINT = (
    "use a chat model that ships one (e.g. smollm2-135m-instruct), or name a template: chat_template='chatml' "
    "(--chat-template chatml) or Jinja source"
)


# -- the data --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstructExample:
    """One chat: the user's prompt and the assistant's answer, and where the function came from."""

    prompt: str
    answer: str
    origin: str  # where the function starts: "module.py:line"


@dataclass(frozen=True)
class InstructTask:
    """Which functions become examples, and how many of each split are kept.

    A function qualifies when its source without the docstring is at most `max_source_chars`
    characters and does more than `pass`/`...`, and the first paragraph of its docstring, joined
    into one line, has `min_answer_words` words or more, at most `max_answer_chars` characters,
    and does not open with a call signature (`S.pop([index]) -> item`).
    """

    n_train: int | None = 512  # None: all
    n_test: int | None = 32
    test_share: float = 0.1  # share of the modules held out
    max_source_chars: int = 500
    max_answer_chars: int = 240
    min_answer_words: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.test_share < 1.0:
            raise UsageError(f"InstructTask.test_share={self.test_share} must be in (0, 1)")
        for name in ("n_train", "n_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"InstructTask.{name}={getattr(self, name)} must be >= 1 (or None for all)")


@dataclass
class InstructData:
    """Training and held-out chats, and the modules each side came from."""

    train: list[InstructExample]
    test: list[InstructExample]
    train_files: list[str] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)


def first_paragraph(docstring: str) -> str:
    """The docstring's first paragraph as one line (its lines joined by single spaces)."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def _does_nothing(stmt: ast.stmt) -> bool:
    """`pass`, `...` or `raise NotImplementedError`: a body with nothing to explain."""
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return stmt.value.value is ...
    return isinstance(stmt, ast.Pass | ast.Raise)


def _body_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The function's source, dedented, with the docstring's lines removed (None: nothing else left,
    or a docstring that shares a line with code)."""
    doc, rest = node.body[0], node.body[1:]
    if all(_does_nothing(s) for s in rest):  # (also: no statement besides the docstring)
        return None
    if doc.lineno == node.lineno or rest[0].lineno == doc.end_lineno:
        return None
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    kept = lines[start - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    return textwrap.dedent("".join(kept)).strip("\n")


def functions_with_docstrings(path: Path, task: InstructTask) -> list[tuple[int, str, str]]:
    """(line of the def, source without docstring, first paragraph) of each qualifying function in a file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        answer = first_paragraph(doc)
        if (len(answer.split()) < task.min_answer_words or len(answer) > task.max_answer_chars
                or SIGNATURE.match(answer)):  # fmt: skip
            continue
        body = _body_without_docstring(node, lines)
        if body is None or len(body) > task.max_source_chars:
            continue
        found.append((node.lineno, body, answer))
    return found


def _held_out(relative: str, task: InstructTask) -> bool:
    """A module is held out by a seeded hash of its path: stable across runs and machines."""
    return zlib.crc32(f"{task.seed}:{relative}".encode()) % 10_000 < task.test_share * 10_000


def explain_function_task(task: InstructTask | None = None, root: str | os.PathLike | None = None) -> InstructData:
    """The "explain this function" chats from the top-level modules of the standard library (`root`:
    another directory of *.py files), split by module; deterministic for a given `task.seed`.

    Within each split an example appears once (same source), a held-out example whose source or
    answer also occurs in training is dropped, and `n_train`/`n_test` examples are drawn with the seed.
    """
    task = task or InstructTask()
    root = Path(root) if root is not None else stdlib_root()
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"{root} holds no *.py files to make examples from")
    splits: dict[bool, dict[str, InstructExample]] = {False: {}, True: {}}
    names: dict[bool, list[str]] = {False: [], True: []}
    for path in files:
        held = _held_out(path.name, task)
        names[held].append(path.name)
        for line, body, answer in functions_with_docstrings(path, task):
            splits[held].setdefault(body, InstructExample(PROMPT.format(source=body), answer, f"{path.name}:{line}"))
    train = list(splits[False].values())
    seen_answers = {e.answer for e in train}
    test = [e for body, e in splits[True].items() if body not in splits[False] and e.answer not in seen_answers]
    rng = random.Random(task.seed)
    train = rng.sample(train, task.n_train) if task.n_train is not None and len(train) > task.n_train else train
    test = rng.sample(test, task.n_test) if task.n_test is not None and len(test) > task.n_test else test
    if not train or not test:
        raise UsageError(
            f"{root} gave {len(train)} training and {len(test)} held-out examples; both need at least one "
            "(raise max_source_chars / test_share, or point root at more modules)"
        )
    return InstructData(train, test, names[False], names[True])


# -- the chat-template mask -------------------------------------------------------------------------
def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends the assistant's turn: the tokenizer's eos (`<|im_end|>` for ChatML)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UsageError("the tokenizer has no eos token, so the end of the assistant's turn cannot be found")
    return int(eos)


def check_chat_template(tokenizer: Any, template: str | None = None, what: str = "the model") -> None:
    """A clear error when neither `template` nor the tokenizer gives a chat template."""
    if tokenizer is None:
        raise UsageError(f"{what} carries no tokenizer, so the chats cannot be encoded; load one that has it")
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{what}'s tokenizer has no chat template, which instruction fine-tuning needs; "
                         + TEMPLATE_HINT)  # fmt: skip


def chat_ids(tokenizer: Any, prompt: str, answer: str, template: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, assistant ids) of one chat rendered with the chat template.

    The prompt is the conversation up to and including the assistant header (what generation is
    given: `add_generation_prompt=True`); the assistant ids are the answer and the end-of-turn token,
    and nothing after it (ChatML's trailing newline is not part of the turn). The two are encoded
    apart, as a prompt is at inference, so training sees the token boundary generation will.
    """
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, add_generation_prompt=True, template=template)
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": answer}], add_generation_prompt=False, template=template
    )
    if not full.startswith(head):
        raise UsageError(
            "the chat template renders the conversation before the answer differently from the prompt it "
            "gives for generation, so the assistant's tokens cannot be told apart; use a template whose "
            "generation prompt is a prefix of the full chat (ChatML, Llama 3, ...)"
        )
    end = end_of_turn_id(tokenizer)
    turn = tokenizer.encode(full[len(head) :], add_special_tokens=False, allowed_special="all")
    if end not in turn:
        raise UsageError(
            f"the chat template does not end the assistant's turn with the eos token (id {end}); "
            "use a template that does, or a tokenizer whose eos token is the end-of-turn token"
        )
    head_ids = tokenizer.encode(head, add_special_tokens=False, allowed_special="all")
    return head_ids, turn[: turn.index(end) + 1]


def chat_rows(
    tokenizer: Any, examples: list[InstructExample], max_len: int, pad_id: int, template: str | None = None
) -> tuple[torch.Tensor, list[InstructExample]]:
    """Rows [N, 2 + max_len] (int64): prompt length, total length, the ids, padding -> (rows, the
    examples they hold). A chat longer than `max_len` tokens is left out, never cut (that would drop
    the end of the turn)."""
    encoded = [(e, *chat_ids(tokenizer, e.prompt, e.answer, template)) for e in examples]
    kept = [(e, head, turn) for e, head, turn in encoded if len(head) + len(turn) <= max_len]
    rows = torch.full((len(kept), 2 + max_len), pad_id, dtype=torch.long)
    for i, (_, head, turn) in enumerate(kept):
        rows[i, 0], rows[i, 1] = len(head), len(head) + len(turn)
        rows[i, 2 : 2 + len(head) + len(turn)] = torch.tensor(head + turn)
    return rows, [e for e, _, _ in kept]


@dataclass
class ChatCollate:
    """Rows from `chat_rows` [B, 2 + L] -> input_ids [B, T] (T = longest chat, right-padded with
    `pad_id`) and labels [B, T]: the ids on the assistant's tokens, -100 everywhere else.

    No attention mask is needed: padding is on the right and attention is causal, so no real token
    sees a pad, and pads carry no label.
    """

    pad_id: int

    def __call__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = rows.long()
        starts, lengths = rows[:, 0], rows[:, 1]
        width = int(lengths.max())
        ids = rows[:, 2 : 2 + width]
        pos = torch.arange(width)
        assistant = (pos >= starts[:, None]) & (pos < lengths[:, None])
        return {"input_ids": ids, "labels": ids.masked_fill(~assistant, IGNORE)}


# -- fine-tuning --------------------------------------------------------------------------------------
@dataclass
class Sample:
    """A held-out prompt and the model's greedy answer to it before and after training."""

    origin: str
    prompt: str
    reference: str
    answer_before: str
    answer_after: str


@dataclass
class InstructResult:
    """What a run reports: held-out loss (mean over the assistant tokens of each held-out batch)
    before and after training, a sample answer, and the data's sizes."""

    trainer: Trainer
    loss_before: float
    loss_after: float
    sample: Sample
    n_train: int
    n_test: int
    dropped: int  # examples longer than max_len, left out
    saved: Path | None  # the checkpoint (or adapter) written


def answer(model: nn.Module, prompt: str, max_new_tokens: int = 64, template: str | None = None) -> str:
    """The model's greedy answer to one user prompt, rendered with the chat template."""
    tokenizer = model.tokenizer
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, template=template
    )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens, temperature=0.0,
                             eos_token_id=end_of_turn_id(tokenizer))  # fmt: skip
    model.train(was_training)
    return tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True).strip()


def _save_lora_run(model: nn.Module, trainer: Trainer, run_dir: Path, source: str | None) -> Path:
    """A LoRA run's directory: adapter/ (PEFT format), metrics.jsonl and loss_curve.png."""
    import json

    from qkv.atomic import atomic_write_text
    from qkv.nn.lora import save_adapter
    from qkv.training.trainer import LOSS_CURVE_FILE, METRICS_FILE
    from qkv.viz.loss_curve import plot_loss_curve

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in trainer.history))
    plot_loss_curve(trainer.history, run_dir / LOSS_CURVE_FILE)
    return save_adapter(model, run_dir / ADAPTER_DIR, base_model_name_or_path=source)


def instruct_finetune(
    model: str | os.PathLike | nn.Module,
    config: TrainingConfig,
    *,
    task: InstructTask | None = None,
    data: InstructData | None = None,
    max_len: int = 384,
    batch_size: int = 4,
    chat_template: str | None = None,
    sample_tokens: int = 64,
    resume: bool = False,
    lora: LoraConfig | None = None,
) -> InstructResult:
    """Fine-tune a chat model (a source for `qkv.load`, or a decoder with a tokenizer) on the
    "explain this function" chats -> losses, a sample answer and the trainer.

    The model loads as float32 weights (`dequantize=True`); data: chats to use instead of
    `explain_function_task(task)`; max_len: tokens per chat (longer ones are left out); chat_template:
    a template name or Jinja source when the model's own is missing or unwanted; resume: continue
    the run in `<config.out_dir>/checkpoint`; lora: train low-rank adapters on the frozen model
    instead of every weight. With `config.out_dir` the run directory gets metrics.jsonl,
    loss_curve.png and checkpoint/ (the tuned model), or with lora adapter/ (PEFT format, the
    adapter alone).
    """
    if lora is not None:
        if resume:
            raise UsageError("resume is not available for LoRA runs (the run saves the adapter only); start again")
        run_dir = Path(config.out_dir) if config.out_dir else None
        if run_dir is not None and (run_dir / ADAPTER_DIR).exists():
            raise UsageError(f"{run_dir} already holds a LoRA run ({ADAPTER_DIR}/); choose another run directory")
        # The Trainer would save the whole wrapped model; a LoRA run writes its adapter instead.
        config = dataclasses.replace(config, out_dir=None)
    checkpoint = run_checkpoint(config, resume)
    source = None if isinstance(model, nn.Module) else str(model)
    if checkpoint is not None:
        from qkv.checkpoints.native import load_native

        model = load_native(checkpoint)
    elif not isinstance(model, nn.Module):
        from qkv.loading import load

        model = load(model, dequantize=True)
    cfg = model.config
    if cfg.family != "decoder":
        raise UsageError(f"instruction fine-tuning trains a decoder (a chat model); this model is a {cfg.family!r}")
    check_chat_template(getattr(model, "tokenizer", None), chat_template)
    tokenizer = model.tokenizer
    if lora is not None:
        apply_lora(model, lora)  # freezes everything else: the optimizer sees only the adapters
    data = data or explain_function_task(task)
    max_len = min(max_len, cfg.max_seq_len)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else end_of_turn_id(tokenizer)
    rows, train = chat_rows(tokenizer, data.train, max_len, pad, chat_template)
    val_rows, test = chat_rows(tokenizer, data.test, max_len, pad, chat_template)
    if len(rows) < batch_size or not len(val_rows):
        raise UsageError(
            f"{len(rows)} training and {len(val_rows)} held-out chats fit in max_len={max_len} tokens "
            f"(batch_size={batch_size}); raise max_len, or lower the batch size"
        )
    from qkv.training.data import BlockLoader

    seed = task.seed if task is not None else 0
    seed_everything(seed)
    loader = BlockLoader(rows, batch_size, seed=seed)
    collate = ChatCollate(pad)
    if checkpoint is not None:
        trainer = Trainer.from_checkpoint(checkpoint, loader, val_rows, collate, config=config, model=model,
                                          eval_batch_size=batch_size)  # fmt: skip
    else:
        trainer = Trainer(model, config, loader, val_rows, collate, eval_batch_size=batch_size)
    probe = test[0]
    before = answer(model, probe.prompt, sample_tokens, chat_template)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    evals = [r for r in trainer.history if "eval_loss" in r]  # train() evaluates after its last step
    loss_after = (
        evals[-1]["eval_loss"] if evals and evals[-1]["step"] == trainer.step else trainer.evaluate()["eval_loss"]
    )
    after = answer(model, probe.prompt, sample_tokens, chat_template)
    saved = trainer.checkpoint_path
    if lora is not None:
        saved = _save_lora_run(model, trainer, run_dir, source) if run_dir is not None else None
    return InstructResult(
        trainer=trainer, loss_before=loss_before, loss_after=loss_after,
        sample=Sample(probe.origin, probe.prompt, probe.answer, before, after),
        n_train=len(train), n_test=len(test), dropped=len(data.train) + len(data.test) - len(train) - len(test),
        saved=saved,
    )  # fmt: skip
