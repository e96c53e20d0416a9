"""Instruction fine-tuning (`qkv.training.instruct`): the stdlib "explain this function" chats, the
chat-template mask (labels on the assistant's answer and end-of-turn token only), and
`instruct_finetune` end to end on a tiny model (and, marked `real`, on SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import ast
import dataclasses
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from tests.conftest import DEFAULT_THREADS

from qkv import DecoderLM, ModelConfig
from qkv.errors import UsageError
from qkv.tokenizer import load_tokenizer, train_tokenizer
from qkv.tokenizer.chat_template import CHAT_TEMPLATES
from qkv.training import TrainingConfig
from qkv.training.instruct import (
    IGNORE,
    ChatCollate,
    InstructData,
    InstructTask,
    chat_ids,
    chat_rows,
    explain_function_task,
    first_paragraph,
    instruct_finetune,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A dozen modules with many short documented functions: enough for both splits, fast to parse.
MODULES = ["bisect.py", "calendar.py", "colorsys.py", "fnmatch.py", "genericpath.py", "glob.py", "gzip.py",
           "heapq.py", "ipaddress.py", "keyword.py", "shlex.py", "textwrap.py", "uuid.py", "weakref.py"]  # fmt: skip
SMALL = InstructTask(n_train=24, n_test=6, test_share=0.3, max_source_chars=300)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stdlib")
    for name in MODULES:
        shutil.copy(STDLIB / name, root / name)
    return root


@pytest.fixture(scope="module")
def data(root) -> InstructData:
    return explain_function_task(SMALL, root)


@pytest.fixture(scope="module")
def chatml_model(root) -> DecoderLM:
    """A tiny random LLaMA whose tokenizer is a byte-level BPE with ChatML's tokens and template
    (eos = <|im_end|>, the end of a turn)."""
    texts = [(root / name).read_text(encoding="utf-8") for name in MODULES]
    tok = train_tokenizer(kind="bpe", texts=texts, vocab_size=600, special_tokens=["<|im_end|>", "<|im_start|>"],
                          show_progress=False)  # fmt: skip
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=512,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)  # fmt: skip
    model = DecoderLM(cfg)
    model.tokenizer = tok
    return model


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


# -- the data --------------------------------------------------------------------------------------
def _function_at(source_file: Path, line: int) -> ast.FunctionDef:
    tree = ast.parse(source_file.read_text(encoding="utf-8"))
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.lineno == line]
    return node


def test_examples_are_functions_without_docstrings_and_their_first_paragraph(data, root):
    for example in data.train + data.test:
        module, line = example.origin.split(":")
        body = example.prompt.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        assert example.prompt.startswith("Explain what this Python function does:")
        original = _function_at(root / module, int(line))
        parsed = ast.parse(body).body[0]  # the shown source parses on its own ...
        assert parsed.name == original.name and ast.get_docstring(parsed) is None  # ... and has no docstring
        assert ast.dump(parsed.args) == ast.dump(original.args) and len(parsed.body) == len(original.body) - 1
        assert first_paragraph(ast.get_docstring(original)) == example.answer
        assert len(body) <= SMALL.max_source_chars and len(example.answer) <= SMALL.max_answer_chars
        assert len(example.answer.split()) >= SMALL.min_answer_words and "\n" not in example.answer


def test_split_is_by_module_deterministic_and_seeded(data, root):
    assert len(data.train) == SMALL.n_train and len(data.test) == SMALL.n_test
    assert not set(data.train_files) & set(data.test_files)
    assert sorted(data.train_files + data.test_files) == sorted(MODULES)
    assert {e.origin.split(":")[0] for e in data.train} <= set(data.train_files)
    assert {e.origin.split(":")[0] for e in data.test} <= set(data.test_files)
    assert not {e.answer for e in data.test} & {e.answer for e in data.train}
    assert explain_function_task(SMALL, root) == data
    other = explain_function_task(InstructTask(**{**SMALL.__dict__, "seed": 1}), root)
    assert other.test_files != data.test_files


def test_first_paragraph_joins_its_lines():
    assert first_paragraph("Return the\n  sum of x.\n\nMore detail.") == "Return the sum of x."


def test_bad_task_options():
    with pytest.raises(UsageError, match="test_share"):
        InstructTask(test_share=1.0)
    with pytest.raises(UsageError, match="n_train"):
        InstructTask(n_train=0)


# -- the mask ---------------------------------------------------------------------------------------
def assert_mask_is_the_answers(tokenizer, examples, template=None):
    """Collate the examples as one padded batch; each row's labelled tokens decode to exactly its
    answer + <|im_end|>, everything else is -100, and the ids are the template's rendering."""
    rows, kept = chat_rows(tokenizer, examples, 512, pad_id=tokenizer.eos_token_id, template=template)
    assert kept == examples
    batch = ChatCollate(tokenizer.eos_token_id)(rows)
    lengths = rows[:, 1]
    assert len(set(lengths.tolist())) > 1  # rows of different lengths: the batch holds padding
    assert batch["input_ids"].shape == batch["labels"].shape == (len(examples), int(lengths.max()))
    for i, example in enumerate(examples):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        labelled = (labels != IGNORE).nonzero().flatten()
        assert labelled.tolist() == list(range(int(rows[i, 0]), int(lengths[i])))  # one contiguous span
        assert torch.equal(labels[labelled], ids[labelled])
        assert tokenizer.decode(ids[labelled].tolist()) == example.answer + "<|im_end|>"
        assert (labels[int(lengths[i]) :] == IGNORE).all()  # padding
        chat = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=False, template=template)
        assert rendered.endswith("<|im_end|>\n")
        assert tokenizer.decode(ids[: int(lengths[i])].tolist()) == rendered[: -len("\n")]
        prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, template=template)
        assert tokenizer.decode(ids[: int(rows[i, 0])].tolist()) == prompt


def test_mask_covers_only_the_answer_and_end_of_turn(chatml_model, data):
    assert_mask_is_the_answers(chatml_model.tokenizer, data.train[:5])


@pytest.mark.real
def test_mask_with_smollm2_template(smollm2_tokenizer, data):
    """SmolLM2's own template (from its GGUF; it adds a system prompt). Encoding the prompt and the
    answer apart gives the ids of encoding the whole rendered chat at once."""
    tok = smollm2_tokenizer
    assert "You are a helpful AI assistant named SmolLM" in tok.chat_template
    assert_mask_is_the_answers(tok, data.test[:4])
    for example in data.test[:4]:
        head, turn = chat_ids(tok, example.prompt, example.answer)
        whole = tok.apply_chat_template(
            [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}],
            add_generation_prompt=False, tokenize=True,
        )  # fmt: skip
        assert whole[: len(head) + len(turn)] == head + turn


def test_padded_rows_get_the_logits_they_get_alone(chatml_model, data):
    """No attention mask is needed: padding is on the right of a causal model."""
    tok = chatml_model.tokenizer
    rows, _ = chat_rows(tok, data.train[:3], 512, pad_id=tok.eos_token_id)
    batch = ChatCollate(tok.eos_token_id)(rows)
    chatml_model.eval()
    with torch.no_grad():
        together = chatml_model(batch["input_ids"]).logits
        for i in range(3):
            n = int(rows[i, 1])
            alone = chatml_model(batch["input_ids"][i : i + 1, :n]).logits
            torch.testing.assert_close(together[i, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_template_without_end_of_turn_eos_is_an_error(data):
    """A tokenizer whose eos is not ChatML's end of turn: the turn's end cannot be found."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_tokenizer(kind="bpe", texts=["def f(x): return x"] * 20, vocab_size=300, special_tokens=specials,
                          show_progress=False)  # fmt: skip
    with pytest.raises(UsageError, match="does not end the assistant's turn with the eos token"):
        chat_ids(tok, "Hi", "Hello", template="chatml")


# -- fine-tuning --------------------------------------------------------------------------------------
def test_instruct_finetune_tiny_end_to_end(chatml_model, data, tmp_path):
    """A few steps on the tiny model: held-out loss is measured before and after, the loss on the
    training chats goes down, the checkpoint reloads with its chat template, and a sample answer
    is generated."""
    import copy

    import qkv

    model = copy.deepcopy(chatml_model)
    config = TrainingConfig(steps=12, lr=3e-3, warmup_steps=0, out_dir=str(tmp_path / "run"), progress=False)
    result = instruct_finetune(model, config, data=data, batch_size=4, max_len=512, sample_tokens=8)
    assert result.n_train == len(data.train) and result.n_test == len(data.test) and result.dropped == 0
    losses = [r["loss"] for r in result.trainer.history if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert result.loss_after < result.loss_before
    assert result.loss_before == pytest.approx(6.4, abs=0.3)  # ~ln(600): the random model is near uniform
    assert result.sample.reference == data.test[0].answer
    assert isinstance(result.sample.answer_after, str)
    reloaded = qkv.load(result.saved)
    assert reloaded.tokenizer.chat_template == CHAT_TEMPLATES["chatml"]
    for name, p in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], p, msg=name)


def test_instruct_finetune_lora_writes_an_adapter(chatml_model, data, tmp_path):
    import copy

    from qkv.nn.lora import LoraConfig, load_adapter, lora_parameters

    model = copy.deepcopy(chatml_model)
    base = {n: p.clone() for n, p in model.named_parameters()}
    config = TrainingConfig(steps=4, lr=1e-2, warmup_steps=0, out_dir=str(tmp_path / "lora"), progress=False)
    result = instruct_finetune(model, config, data=data, batch_size=4, max_len=512, sample_tokens=4,
                               lora=LoraConfig(rank=4, alpha=8))  # fmt: skip
    assert result.saved == tmp_path / "lora" / "adapter"
    assert {p.name for p in result.saved.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert (tmp_path / "lora" / "metrics.jsonl").is_file() and not (tmp_path / "lora" / "checkpoint").exists()
    assert result.loss_after < result.loss_before
    trained = lora_parameters(model)
    assert trained and all(p.requires_grad for p in trained)
    for name, p in model.named_parameters():  # the base is frozen and unchanged
        if not p.requires_grad:
            key = name.replace(".base.", ".")
            assert torch.equal(p, base[key]), name
    fresh = copy.deepcopy(chatml_model).eval()  # the saved adapter on the base model: the tuned logits
    load_adapter(fresh, result.saved)
    ids = torch.tensor([chat_ids(model.tokenizer, data.test[0].prompt, data.test[0].answer)[0]])
    with torch.no_grad():
        tuned = model.eval()(ids).logits
        assert not torch.allclose(chatml_model.eval()(ids).logits, tuned, atol=1e-4)  # training changed them
        torch.testing.assert_close(fresh(ids).logits, tuned, rtol=1e-5, atol=1e-5)


def test_model_without_chat_template_is_a_clear_error(chatml_model, data):
    import copy

    model = copy.deepcopy(chatml_model)
    model.tokenizer.chat_template = None
    with pytest.raises(UsageError, match="has no chat template.*--chat-template chatml"):
        instruct_finetune(model, TrainingConfig(steps=1, progress=False), data=data)


@pytest.mark.real
@pytest.mark.slow  # ~2 minutes on 2 busy cores
def test_smollm2_few_steps(smollm2_tokenizer, data):
    """SmolLM2-135M-Instruct, 3 full fine-tuning steps with bf16 autocast on 12 chats: the loss on
    those same chats (given as the held-out set) goes down."""
    import qkv

    model = qkv.load("smollm2-135m-instruct", dequantize=True)
    few = InstructData(train=data.train[:12], test=data.train[:4])
    config = TrainingConfig(steps=3, lr=5e-5, warmup_steps=0, bf16=True, progress=False)
    torch.set_num_threads(DEFAULT_THREADS)  # (the `one_thread` fixture puts one thread back afterwards)
    result = instruct_finetune(model, config, data=few, batch_size=4, sample_tokens=4)
    assert result.loss_after < result.loss_before


def test_grad_checkpoint_trains_the_same(chatml_model, data):
    """`TrainingConfig(grad_checkpoint=True)` (`qkv finetune --grad-checkpoint`): the same losses."""
    import copy

    from qkv.models.stack import TransformerStack

    runs = []
    for flag in (False, True):
        model = copy.deepcopy(chatml_model)
        config = TrainingConfig(steps=3, lr=3e-3, warmup_steps=0, grad_checkpoint=flag, progress=False)
        result = instruct_finetune(model, config, data=data, batch_size=4, max_len=512, sample_tokens=2)
        assert all(s.grad_checkpointing == flag for s in model.modules() if isinstance(s, TransformerStack))
        runs.append([r["loss"] for r in result.trainer.history if "loss" in r] + [result.loss_after])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_resume_gives_the_uninterrupted_losses(chatml_model, data, tmp_path):
    """Stop after 2 of 4 steps, resume from the checkpoint: the losses of one run of 4 steps (a
    constant learning rate, so the shorter first run has the same schedule)."""
    import copy

    def run(steps: int, out: Path, resume: bool = False) -> list[float]:
        config = TrainingConfig(steps=4, lr=3e-3, min_lr=3e-3, warmup_steps=0, out_dir=str(out), progress=False)
        model = copy.deepcopy(chatml_model)
        if steps < 4:  # the first half: a trainer stopped early, its checkpoint saved
            result = instruct_finetune(model, dataclasses.replace(config, steps=steps), data=data, batch_size=4,
                                       max_len=512, sample_tokens=2)  # fmt: skip
        else:
            result = instruct_finetune(model, config, data=data, batch_size=4, max_len=512, sample_tokens=2,
                                       resume=resume)  # fmt: skip
        return [r["loss"] for r in result.trainer.history if "loss" in r]

    whole = run(4, tmp_path / "whole")
    first = run(2, tmp_path / "split")
    second = run(4, tmp_path / "split", resume=True)
    assert first + second == pytest.approx(whole, rel=1e-6)
