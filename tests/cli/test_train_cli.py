"""`qkv train`: trains a tokenizer and a model from text files, writes a run directory, resumes."""

import json

import pytest
import torch

from qkv.cli.main import main
from qkv.loading import load

pytest.importorskip("qkv.tokenizer")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    return path


def train(corpus, out, *extra):
    return main(["train", "--corpus", str(corpus), "--preset", "tiny-gpt2", "--out", str(out), "--seq-len", "16",
                 "--batch-size", "2", "--vocab-size", "300", "--quiet", *extra])  # fmt: skip


def steps_logged(out):
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_train_then_resume(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(corpus, out, "--steps", "3") == 0
    assert "eval loss" in capsys.readouterr().out
    model = load(out / "checkpoint")
    assert model.tokenizer is not None and model.config.vocab_size <= 300
    assert (out / "loss_curve.png").is_file() and steps_logged(out) == [1, 2, 3]
    assert train(corpus, out, "--steps", "3") == 2  # a fresh run never overwrites one
    assert "already holds a run" in capsys.readouterr().err

    assert train(corpus, out, "--steps", "5", "--resume") == 0
    assert steps_logged(out) == [1, 2, 3, 4, 5]


def test_bad_arguments_exit_2(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train(corpus, tmp_path / "run", "--steps", "0")
    assert exc.value.code == 2
    assert train(tmp_path / "missing.txt", tmp_path / "run", "--steps", "1") == 2
    assert "missing.txt" in capsys.readouterr().err
    assert train(corpus, tmp_path / "run", "--steps", "1", "--preset", "tiny-nope") == 2


@pytest.mark.parametrize("task", ["image-classification", "clip"])
def test_train_on_digits_saves_a_model_that_classifies(task, tmp_path, capsys):
    """`qkv train --task ... --data digits`: a short run writes metrics, a checkpoint with its
    image preprocessing (and for CLIP its tokenizer), and reports held-out metrics."""
    pytest.importorskip("sklearn")

    import numpy as np
    from PIL import Image

    import qkv
    from qkv.image import preprocess

    out = tmp_path / task
    code = main(["train", "--task", task, "--data", "digits", "--steps", "20", "--out", str(out), "--quiet"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[0])
    assert metrics["test_images"] == 359 and (out / "metrics.jsonl").is_file()
    model = qkv.load(out / "checkpoint")
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    pixels = preprocess(image, model.preprocessing, 1)
    assert pixels.shape == (1, 1, 16, 16)
    if task == "image-classification":
        assert "accuracy" in metrics and (out / "confusion.png").is_file()
        assert model(pixels).logits.shape == (1, 10)
    else:
        assert {"zero_shot_accuracy", "recall@1", "recall@5"} <= set(metrics) and model.tokenizer is not None


def test_task_needs_data(capsys):
    assert main(["train", "--task", "clip", "--steps", "5"]) == 2
    assert "--data" in capsys.readouterr().err


def test_nproc_must_divide_the_global_batch(corpus, tmp_path, capsys):
    assert train(corpus, tmp_path / "run", "--steps", "1", "--nproc", "3") == 2  # --batch-size 2
    err = capsys.readouterr().err
    assert "--batch-size 2 is the global batch and must split evenly over 3 processes" in err
    assert not (tmp_path / "run").exists()  # refused before any process started


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "tiny-llama"], "was trained with a different model config than preset 'tiny-llama'"),
        (["--objective", "span", "--preset", "tiny-t5"], "is a run of objective 'causal', not 'span'"),
    ],
    ids=["preset", "objective"],
)
def test_resuming_a_sharded_checkpoint_with_another_run_is_refused(corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert train(corpus, out, "--steps", "2", "--sharded-checkpoint") == 0
    assert (out / "checkpoint" / "distributed" / ".metadata").is_file()
    capsys.readouterr()
    assert train(corpus, out, "--steps", "4", "--resume", *extra) == 2
    assert message in capsys.readouterr().err


def test_resuming_a_partial_sharded_checkpoint_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(corpus, out, "--steps", "2", "--sharded-checkpoint") == 0
    (out / "checkpoint" / "distributed" / ".metadata").unlink()
    capsys.readouterr()
    assert train(corpus, out, "--steps", "4", "--resume") == 2
    assert "has no .metadata: the sharded checkpoint was not written completely" in capsys.readouterr().err


@pytest.mark.slow  # two torchrun launches and a single-process run: ~45 s on 2 busy cores
@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "fsdp"])
def test_nproc_2_trains_as_one_process_and_resumes_on_one(corpus, tmp_path, shard):
    """`qkv train --nproc 2` (torchrun, gloo) logs the losses of the same command on one process
    (within 1e-5); its sharded checkpoint resumes with --resume on one process."""

    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--batch-size", "4", "--save-every", "2"]
    assert train(corpus, one, *flags, "--steps", "6") == 0
    assert train(corpus, two, *flags, "--steps", "6", "--nproc", "2", *(["--shard"] if shard else [])) == 0
    assert sorted(p.name for p in (two / "checkpoint" / "distributed").iterdir())[0] == ".metadata"
    assert load(two / "checkpoint").tokenizer is not None
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=0, atol=1e-5)
    for out in (one, two):  # both continue on one process, for 2 more steps
        assert train(corpus, out, *flags, "--steps", "8", "--resume") == 0
    assert steps_logged(two) == list(range(1, 9))
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=0, atol=1e-5)


@pytest.mark.slow  # a torchrun launch: ~25 s on 2 busy cores
def test_nproc_2_masked_lm_shares_rank_0s_tokenizer_and_resumes_on_one(corpus, tmp_path):
    """WordPiece training differs from process to process: rank 0 trains it and sends it to the others
    (else the ranks' vocabularies disagree). The MLM collate's state is the same on both ranks, so
    the run resumes on one process."""
    out = tmp_path / "mlm"
    flags = ["--preset", "tiny-bert", "--objective", "mlm", "--batch-size", "4"]
    assert train(corpus, out, *flags, "--steps", "2", "--nproc", "2") == 0
    assert train(corpus, out, *flags, "--steps", "4", "--resume") == 0
    assert steps_logged(out) == [1, 2, 3, 4]
