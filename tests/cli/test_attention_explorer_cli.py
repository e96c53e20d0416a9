"""`qkv attention --html` and `--ablate`: the page is written, the printed changes are the library's,
and bad input fails before the model is loaded."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qkv.checkpoints.native import save_native
from qkv.cli.main import main
from qkv.interpret import ablate_heads
from qkv.tokenizer import train_tokenizer
from tiny_models import tiny_model

PROMPT = "def fibonacci(n): return n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = train_tokenizer(kind="bpe", texts=[PROMPT] * 10, vocab_size=280, show_progress=False)
    model = tiny_model("tiny-gpt2", vocab_size=tok.vocab_size)
    model.tokenizer = tok
    return save_native(model, tmp_path_factory.mktemp("ckpt") / "gpt2"), model


def test_html_page_and_no_png(checkpoint, tmp_path, monkeypatch, capsys):
    ckpt, _ = checkpoint
    monkeypatch.chdir(tmp_path)
    assert main(["attention", str(ckpt), "--prompt", PROMPT, "--html", "page.html"]) == 0
    html = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and '"lens":{' in html
    assert "attention explorer written to page.html" in capsys.readouterr().out
    assert not (tmp_path / "attention.png").exists()  # --html alone draws no PNG
    assert main(["attention", str(ckpt), "--prompt", PROMPT, "--html", "p2.html", "--out", "m.png"]) == 0
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_ablate_prints_the_librarys_changes(checkpoint, capsys):
    ckpt, model = checkpoint
    assert main(["attention", str(ckpt), "--prompt", PROMPT, "--ablate", "1.2", "0.0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("head 1.2 zeroed: loss ")
    ids = torch.tensor([model.tokenizer.encode(PROMPT)])
    expected = ablate_heads(model, ids, [(1, 2), (0, 0)])
    printed = [float(re.search(r"loss ([-+][0-9.]+)", line).group(1)) for line in lines]
    assert printed == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--ablate", "2.0"], "layer 2 out of range; the model has layers 0..1"),
        (["--ablate", "0.4"], "head 4 out of range; layer 0 has heads 0..3"),
        (["--ablate", "x"], "LAYER.HEAD"),
        (["--html", "p.html", "--heads", "1"], "--heads picks the PNG's panels"),
        (["--rows", "3"], "give --html too"),
    ],
)
def test_bad_input(checkpoint, tmp_path, capsys, argv, match):
    ckpt, _ = checkpoint
    argv = [a if a != "p.html" else str(tmp_path / a) for a in argv]
    assert main(["attention", str(ckpt), "--prompt", PROMPT, *argv]) == 2
    assert match in capsys.readouterr().err


def test_unwritable_html_fails_before_loading(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    missing_model = str(tmp_path / "no-such-model")  # loading it would fail: the path check comes first
    assert main(["attention", missing_model, "--prompt", "x", "--html", str(tmp_path / "a-file" / "p.html")]) == 2
    assert "not a writable directory" in capsys.readouterr().err


def test_encoder_decoder_html_has_three_views(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(kind="bpe", texts=["translate the cat to a dog"] * 10, vocab_size=280, show_progress=False)
    config = transformers.T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    tok.save(tmp_path / "t5")
    argv = [
        "attention",
        str(tmp_path / "t5"),
        "--source",
        "the cat",
        "--target",
        "a dog",
        "--html",
        str(tmp_path / "s.html"),
    ]
    assert main([*argv, "--ablate", "1.3", "--kind", "cross"]) == 0
    out = capsys.readouterr().out
    assert "head 1.3 (cross attention) zeroed: loss" in out
    html = (tmp_path / "s.html").read_text(encoding="utf-8")
    assert all(f'"name":"{name}"' in html for name in ("cross", "self", "encoder"))
    assert main([*argv, "--rows", "1"]) == 2
    assert "an encoder-decoder's page holds every row" in capsys.readouterr().err
    assert main([*argv, "--kind", "self"]) == 2
    assert "the explorer shows all three" in capsys.readouterr().err


def test_vit_image_page_and_ablation(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=16, patch_size=4, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(image)
    argv = ["attention", str(tmp_path / "vit"), "--image", str(image), "--html", str(tmp_path / "v.html")]
    assert main([*argv, "--ablate", "1.2"]) == 0
    out = capsys.readouterr().out
    assert "head 1.2 zeroed: logits max |change|" in out and "loss" not in out  # no loss without labels
    html = (tmp_path / "v.html").read_text(encoding="utf-8")
    assert '"src":"data:image/png;base64,' in html and '"grid":[4,4]' in html
