"""`qkv finetune MODEL --task instruct`: a tiny chat model fine-tuned from the command line (full and
LoRA), and each bad input exits 2 with a message that says what to do."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from cli_run import qkv
from qkv import DecoderLM, ModelConfig
from qkv.checkpoints.native import save_native
from qkv.tokenizer import train_tokenizer

TINY = ["--steps", "2", "--batch-size", "2", "--train-examples", "8", "--test-examples", "2", "--max-len", "400",
        "--sample-tokens", "4", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved with a byte-level BPE that has ChatML's tokens (eos = <|im_end|>)
    but no chat template: the runs below name one with --chat-template chatml."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:4]
    tok = train_tokenizer(kind="bpe", texts=[f.read_text(encoding="utf-8") for f in files], vocab_size=600,
                          special_tokens=["<|im_end|>", "<|im_start|>"], show_progress=False)  # fmt: skip
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=512,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)  # fmt: skip
    model = DecoderLM(cfg)
    model.tokenizer = tok
    return save_native(model, tmp_path_factory.mktemp("tiny") / "chat")


def test_instruct_full_finetune(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = qkv(capsys, "finetune", checkpoint, "--task", "instruct", "--chat-template", "chatml",
                               "--out", out, *TINY)  # fmt: skip
    assert code == 0, stderr
    assert "chats: 8 training, 2 held out" in stdout
    before, after = (float(x) for x in stdout.split("held-out loss (assistant tokens): ")[1].split(" after")[0]
                     .replace(" before,", "").split())  # fmt: skip
    assert 5.0 < before < 8.0 and after > 0  # a random model over 600 tokens: about ln(600) = 6.4
    assert "Explain what this Python function does:" in stdout and "reference:" in stdout and "after:" in stdout
    assert (out / "checkpoint" / "config.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["eval_loss"] for r in records if "eval_loss" in r] == [pytest.approx(after, abs=1e-4)]


def test_instruct_lora(checkpoint, tmp_path, capsys):
    out = tmp_path / "lora"
    code, stdout, stderr = qkv(capsys, "finetune", "--model", checkpoint, "--task", "instruct", "--chat-template",
                               "chatml", "--out", out, "--lora", "--lora-rank", "4", "--lora-targets", "q", "v",
                               *TINY)  # fmt: skip
    assert code == 0, stderr
    assert f"adapter: {out / 'adapter'}" in stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "checkpoint").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "translate"], "invalid choice: 'translate'"),
        (["--task", "instruct", "--lora-rank", "8"], "--lora-rank configure LoRA; add --lora"),
        (["--task", "instruct", "--lora-alpha", "8", "--lora-dropout", "0.1"],
         "--lora-alpha, --lora-dropout configure LoRA; add --lora"),
        (["--task", "instruct", "--data", "x.tsv"], "makes its own chats from the standard library; drop --data"),
        (["--task", "classification", "--lora"], "--task classification needs --data"),
        (["--task", "instruct"], "has no chat template, which instruction fine-tuning needs; use a chat model"),
        (["--task", "instruct", "--chat-template", "chatml", "--lora", "--lora-targets", "nothing"],
         "LoRA target 'nothing' matches no linear layer"),
    ],
)  # fmt: skip
def test_bad_input(checkpoint, tmp_path, capsys, argv, message):
    code, _, stderr = qkv(capsys, "finetune", checkpoint, "--steps", "1", "--out", tmp_path / "x", "--quiet", *argv)
    assert code == 2
    assert message in stderr


def test_model_given_twice_or_not_at_all(checkpoint, capsys):
    code, _, stderr = qkv(capsys, "finetune", checkpoint, "--model", "other", "--task", "instruct", "--steps", "1")
    assert code == 2 and "two models given" in stderr
    code, _, stderr = qkv(capsys, "finetune", "--task", "instruct", "--steps", "1")
    assert code == 2 and "give the model to fine-tune" in stderr


def test_lora_with_classification_is_refused(checkpoint, tmp_path, capsys):
    data = tmp_path / "d.tsv"
    data.write_text("a\thello\nb\tbye\n")
    code, _, stderr = qkv(capsys, "finetune", checkpoint, "--task", "classification", "--data", data, "--lora",
                          "--steps", "1")  # fmt: skip
    assert code == 2 and "--lora is available for --task instruct" in stderr
