"""Attention maps: the weights drawn are the model's own, and the PNG has one panel per layer x head."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from qkv.checkpoints.native import save_native
from qkv.cli.main import main
from qkv.tokenizer import train_tokenizer
from qkv.viz import attention_maps, plot_attention
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny-llama", n_layers=3)


def test_maps_are_the_models_attention_weights(model):
    ids = torch.randint(0, 512, (1, 9))
    weights = attention_maps(model, ids)
    assert weights.shape == (3, 4, 9, 9)
    ref = model(ids, output_attentions=True).attentions
    for layer in range(3):
        assert torch.equal(weights[layer], ref[layer][0].float())
    # causal: nothing above the diagonal, each row a distribution
    assert torch.all(weights.triu(1) == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 4, 9))


def test_png_grid(model, tmp_path):
    weights = attention_maps(model, torch.randint(0, 512, (1, 6)))
    path = plot_attention(weights, list("abcdef"), tmp_path / "map.png", layers=[0, 2], heads=[1, 2, 3])
    with Image.open(path) as img:
        width, height = img.size
    assert img.format == "PNG"
    assert width > height  # 3 heads across, 2 layers down
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize(("kwargs", "match"), [({"layers": [5]}, "layer"), ({"heads": [-1]}, "head")])
def test_bad_selection(model, tmp_path, kwargs, match):
    weights = attention_maps(model, torch.randint(0, 512, (1, 4)))
    with pytest.raises(ValueError, match=match):
        plot_attention(weights, list("abcd"), tmp_path / "x.png", **kwargs)
    assert not (tmp_path / "x.png").exists()


def test_wrong_label_count(model, tmp_path):
    weights = attention_maps(model, torch.randint(0, 512, (1, 4)))
    with pytest.raises(ValueError, match="token labels"):
        plot_attention(weights, list("abc"), tmp_path / "x.png")


def test_cli_writes_map(tmp_path, capsys):
    tok = train_tokenizer(kind="bpe", texts=["def fibonacci(n): return n"] * 10, vocab_size=280, show_progress=False)
    model = tiny_model("tiny-gpt2", vocab_size=tok.vocab_size)
    model.tokenizer = tok
    ckpt = save_native(model, tmp_path / "ckpt")
    code = main(["attention", str(ckpt), "--prompt", "def fibonacci(n):", "--out", str(tmp_path / "m.png")])
    assert code == 0
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 layers x 4 heads" in capsys.readouterr().out
