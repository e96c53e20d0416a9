"""`qkv attention` on an encoder: a BERT checkpoint from `transformers` draws its bidirectional maps."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.cli.main import main
from qkv.tokenizer import train_tokenizer
from qkv.viz import attention_maps

transformers = pytest.importorskip("transformers")


def test_bert_attention_maps_are_bidirectional(tmp_path, capsys):
    tok = train_tokenizer(kind="wordpiece", texts=["the cat sat on the mat"] * 10, vocab_size=60, show_progress=False)
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        attn_implementation="eager",  # returns attention weights
    )
    torch.manual_seed(0)
    hf = transformers.BertModel(config).eval()
    hf.save_pretrained(tmp_path / "bert")
    tok.save(tmp_path / "bert")
    out = tmp_path / "map.png"
    assert main(["attention", str(tmp_path / "bert"), "--prompt", "the cat sat", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 layers x 4 heads" in capsys.readouterr().out
    ids = torch.tensor([tok.encode("the cat sat")])
    weights = attention_maps(qkv.load(tmp_path / "bert"), ids)
    with torch.no_grad():
        ref = torch.stack([a[0] for a in hf(ids, output_attentions=True).attentions])
    assert (weights - ref).abs().max().item() <= 1e-5
    assert weights[:, :, 0, -1].min().item() > 0  # the first token attends to the last: no causal mask


def test_t5_cross_attention_maps_are_target_by_source(tmp_path, capsys):
    tok = train_tokenizer(kind="bpe", texts=["translate the cat to a dog"] * 10, vocab_size=280, show_progress=False)
    config = transformers.T5Config(
        vocab_size=tok.vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        attn_implementation="eager",  # returns attention weights
    )
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "t5")
    tok.save(tmp_path / "t5")
    out = tmp_path / "cross.png"
    argv = ["attention", str(tmp_path / "t5"), "--prompt", "the cat", "--target", "a dog", "--out", str(out)]
    assert main(argv) == 0 and out.read_bytes()[:4] == b"\x89PNG"
    source, target = torch.tensor([tok.encode("the cat")]), torch.tensor([[0, *tok.encode("a dog")]])
    weights = attention_maps(qkv.load(tmp_path / "t5"), source, target, kind="cross")
    with torch.no_grad():
        ref = torch.stack([a[0] for a in hf(source, decoder_input_ids=target, output_attentions=True).cross_attentions])
    assert weights.shape == (2, 4, target.shape[1], source.shape[1])
    assert (weights - ref).abs().max().item() <= 1e-5
    assert main(["attention", str(tmp_path / "t5"), "--prompt", "the cat"]) == 2  # no --target: exit 2
    assert "--target" in capsys.readouterr().err
