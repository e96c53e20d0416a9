"""Input embeddings (`qkv.nn.embedding`): token + position (+ token type), scale, norm, dropout."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.config import ModelConfig
from qkv.nn.embedding import Embeddings
from qkv.nn.position import sinusoidal_positions, sinusoidal_table

V, D, L = 50, 16, 32


pytestmark = pytest.mark.usefixtures("seeded")


def make(position: str, **overrides) -> Embeddings:
    cfg = ModelConfig(vocab_size=V, d_model=D, n_heads=2, max_seq_len=L, position=position, **overrides)
    return Embeddings(cfg).eval()


IDS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
POS = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])


def test_learned_positions_are_added():
    emb = make("learned")
    expected = emb.tokens.weight[IDS] + emb.positions.weight[POS]
    torch.testing.assert_close(emb(IDS, POS), expected)


def test_sinusoidal_positions_and_sqrt_d_scale():
    """Vaswani et al. 2017 §3.4: token embeddings times sqrt(d_model), plus the §3.5 table."""
    emb = make("sinusoidal", scale_embeddings=True)
    assert emb.positions is None and not list(emb.state_dict())[1:]  # the table is not a weight
    expected = emb.tokens.weight[IDS] * math.sqrt(D) + sinusoidal_table(L, D)[POS]
    torch.testing.assert_close(emb(IDS, POS), expected)


def test_marian_sinusoid_layout_equals_hf():
    """Marian puts the sines in the first half of the dimensions and the cosines in the second."""
    pytest.importorskip("transformers")
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    for dim in (16, 15):
        ref = MarianSinusoidalPositionalEmbedding(L, dim).create_weight()
        torch.testing.assert_close(sinusoidal_table(L, dim, layout="halves"), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("position", ["rope", "alibi", "t5", "none"])
def test_positions_inside_attention_add_nothing_here(position):
    emb = make(position)
    torch.testing.assert_close(emb(IDS, POS), emb.tokens.weight[IDS])


def test_token_types_and_embedding_norm():
    """BERT: LayerNorm(token + position + token type); missing token types default to type 0."""
    emb = make("learned", type_vocab_size=2, embed_norm=True)
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 1, 0]])
    summed = emb.tokens.weight[IDS] + emb.positions.weight[POS] + emb.token_types.weight[types]
    torch.testing.assert_close(emb(IDS, POS, types), emb.norm(summed))
    summed0 = emb.tokens.weight[IDS] + emb.positions.weight[POS] + emb.token_types.weight[0]
    torch.testing.assert_close(emb(IDS, POS), emb.norm(summed0))


def test_dropout_only_in_train_mode():
    emb = make("learned", dropout=0.5)
    first = emb(IDS, POS)
    torch.testing.assert_close(emb(IDS, POS), first, atol=0, rtol=0)
    emb.train()
    assert not torch.allclose(emb(IDS, POS), emb(IDS, POS))


def test_sinusoid_is_computed_for_the_positions_used_not_stored():
    """A config may claim any max_seq_len (a hostile one 10^8): nothing of that size is built."""
    emb = Embeddings(ModelConfig(vocab_size=V, d_model=D, n_heads=2, max_seq_len=10**8, position="sinusoidal"))
    assert list(emb.buffers()) == []
    far = torch.tensor([[0, 5, 99_999_999]])
    torch.testing.assert_close(emb(far[:, :1] * 0 + 3, far) - emb.tokens.weight[3], sinusoidal_positions(far, D))
