"""`pretrain` with the encoder objectives: the right model and tokenizer, a loadable checkpoint, a
run that resumes, and clear errors. (Exact resume is checked on the `Trainer` in test_masking.py
and test_electra.py.)"""

import pytest

import qkv
from qkv.errors import UsageError
from qkv.models import Encoder
from qkv.training import TrainingConfig, pretrain


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog and keeps running far away. " * 60)
    return path


def run(corpus, out, objective, steps, resume=False):
    config = TrainingConfig(steps=steps, lr=3e-3, eval_every=2, save_every=2, out_dir=str(out), progress=False)
    return pretrain([corpus], "tiny-bert", config, objective=objective, seq_len=16, batch_size=4, vocab_size=200,
                    resume=resume)  # fmt: skip


@pytest.mark.parametrize("objective", ["mlm", "rtd"])
def test_encoder_objectives_save_a_loadable_encoder_and_resume(corpus, tmp_path, objective):
    trainer = run(corpus, tmp_path / "run", objective, steps=2)
    model = qkv.load(tmp_path / "run" / "checkpoint")
    assert isinstance(model, Encoder) and model.config.head == objective  # rtd: the discriminator
    assert model.tokenizer.kind == "wordpiece" and model.config.pad_token_id == model.tokenizer.pad_token_id
    assert "eval_accuracy" in trainer.history[-1]
    with pytest.raises(UsageError, match="already holds a run"):
        run(corpus, tmp_path / "run", objective, steps=2)

    other = {"mlm": "causal", "rtd": "mlm"}[objective]
    with pytest.raises(
        UsageError, match=f"is a run of objective '{objective}', not '{other}'; resume with --objective"
    ):
        run(corpus, tmp_path / "run", other, steps=4, resume=True)
    resumed = run(corpus, tmp_path / "run", objective, steps=4, resume=True)
    assert resumed.step == 4 and [r["step"] for r in resumed.history if "loss" in r] == [3, 4]


def test_objective_and_preset_must_agree(corpus, tmp_path):
    config = TrainingConfig(steps=1, out_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(UsageError, match="trains family 'encoder', but preset 'tiny-gpt2' has family 'decoder'"):
        pretrain([corpus], "tiny-gpt2", config, objective="mlm", seq_len=16, vocab_size=300)
    with pytest.raises(UsageError, match="trains family 'decoder', but preset 'tiny-bert' has family 'encoder'"):
        pretrain([corpus], "tiny-bert", config, objective="causal", seq_len=16, vocab_size=300)
    with pytest.raises(UsageError, match="unknown objective 'bogus'"):
        pretrain([corpus], "tiny-bert", config, objective="bogus")
