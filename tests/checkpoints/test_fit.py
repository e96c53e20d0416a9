"""`check_config_fits`: a config's layer count and sizes against a file's tensor table, before building."""

from __future__ import annotations

import pytest

from qkv import ModelConfig
from qkv.checkpoints.fit import check_config_fits, layer_indices
from qkv.checkpoints.keymaps import LLAMA
from qkv.errors import CheckpointError

PATTERNS = [name for rule in LLAMA for name in rule.sources]
CFG = ModelConfig.from_name("tiny-llama", vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80)


def shapes(n_layers: int = 2, **changes) -> dict[str, tuple[int, ...]]:
    table = {"model.embed_tokens.weight": (97, 48), "model.norm.weight": (48,), "lm_head.weight": (97, 48)}
    for i in range(n_layers):
        layer = f"model.layers.{i}."
        table |= {layer + "self_attn.q_proj.weight": (48, 48), layer + "mlp.up_proj.weight": (80, 48)}
    return table | changes


def test_layer_indices():
    names = ["model.layers.0.x", "model.layers.11.y", "model.layers.11.z", "model.norm.weight", "model.layers.x.y",
             "model.layers." + "9" * 5000 + ".w"]  # fmt: skip
    assert layer_indices(names, PATTERNS) == {0, 11}


def test_a_config_that_fits_passes():
    check_config_fits(CFG, shapes(), PATTERNS, "ckpt")
    check_config_fits(CFG, shapes(n_layers=3), PATTERNS, "ckpt")  # extra layers: reported later, by name


def test_more_layers_than_the_file_holds():
    with pytest.raises(CheckpointError, match="ckpt: the configuration asks for 3 layers but the file holds .* for 2"):
        check_config_fits(CFG.replace(n_layers=3), shapes(), PATTERNS, "ckpt")


@pytest.mark.parametrize(
    "change, named",
    [(dict(vocab_size=98), "vocab_size=98"), (dict(d_ff=10**9), "d_ff=1000000000"),
     (dict(n_heads=2**20, n_kv_heads=2**20, head_dim=8), "n_heads=1048576, n_kv_heads=1048576, n_heads \\* head_dim")],
)  # fmt: skip
def test_a_size_no_tensor_has(change, named):
    with pytest.raises(CheckpointError, match=f"configuration's {named}.* exceeds every dimension .* largest is 97"):
        check_config_fits(CFG.replace(**change), shapes(), PATTERNS, "ckpt")


def test_an_empty_tensor_vouches_for_no_size():
    with pytest.raises(CheckpointError, match=r"vocab_size=1099511627776 exceeds every dimension"):
        check_config_fits(CFG.replace(vocab_size=2**40), shapes(**{"model.embed_tokens.weight": (0, 2**40)}),
                          PATTERNS, "ckpt")  # fmt: skip


def test_an_encoder_decoder_counts_its_decoder_layers_by_j():
    patterns = ["encoder.block.{i}.layer.0.SelfAttention.q.weight", "decoder.block.{j}.layer.0.SelfAttention.q.weight"]
    table = {
        f"{side}.block.{n}.layer.0.SelfAttention.q.weight": (48, 48) for side in ("encoder", "decoder") for n in (0, 1)
    }
    table |= {"shared.weight": (97, 48), "encoder.block.0.layer.1.DenseReluDense.wi.weight": (80, 48)}
    seq2seq = CFG.replace(family="seq2seq", n_decoder_layers=2)
    check_config_fits(seq2seq, table, patterns, "t5")
    with pytest.raises(CheckpointError, match="t5: the configuration asks for 1000000000 decoder layers .* for 2"):
        check_config_fits(seq2seq.replace(n_decoder_layers=10**9), table, patterns, "t5")
