"""Attention weights of chosen query rows (`attention_rows`, `attention_layers`) computed beside the
fast backend: equal to the eager path's full weights on those rows (fp32, <= 1e-5) for every
family and attention variant, with the model's output still from the fast path, and in
O(rows x keys) memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
from qkv import ModelConfig
from qkv.errors import UsageError
from qkv.models import EncoderDecoder, VisionTransformer
from qkv.models.encoder import Encoder
from qkv.nn import attention
from qkv.nn.attention import attention_weights
from qkv.nn.mask import AttentionMask, alibi_bias, build_attention_mask
from qkv.nn.position import alibi_slopes
from tiny_models import random_ids, tiny_model

TOL = 1e-5
ROWS = [-1, 5, 0, -1]  # a repeated row comes back twice, in the order asked


def _positions(rows: list[int], n: int) -> list[int]:
    return [r % n for r in rows]


def assert_rows_equal(full: tuple, part: tuple, rows: list[int]) -> None:
    """part[l] holds the rows `rows` of full[l] (every layer), to TOL."""
    assert len(full) == len(part)
    for f, p in zip(full, part, strict=True):
        want = f[:, :, _positions(rows, f.shape[2])]
        assert p.shape == want.shape
        assert (p - want).abs().max().item() <= TOL


# --- the function: attention_weights on chosen rows = the eager backend's rows --------------------


def _mask(kind: str, n_heads: int, T: int, S: int, B: int) -> AttentionMask:
    q_slots, k_slots = torch.arange(S - T, S), torch.arange(S)
    padding = torch.ones(B, S, dtype=torch.long)
    padding[1, :3] = 0  # row 1 is left-padded
    if kind == "is_causal":
        return AttentionMask(None, is_causal=True)
    if kind == "window-padding":
        return build_attention_mask(q_slots, k_slots, causal=True, attention_mask=padding, window=4)
    if kind == "alibi":
        bias = alibi_bias(alibi_slopes(n_heads), q_slots, k_slots)
        return build_attention_mask(q_slots, k_slots, causal=True, attention_mask=padding, position_bias=bias)
    if kind == "static-per-row":  # a slot cache: each row's queries at their own slots
        slots = torch.stack((q_slots, q_slots - 2))
        return build_attention_mask(slots, k_slots, causal=True, attention_mask=padding, static=True)
    raise AssertionError(kind)


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)], ids=["mha", "gqa-6-2", "mqa-3"])
@pytest.mark.parametrize("kind", ["is_causal", "window-padding", "alibi", "static-per-row"])
@pytest.mark.parametrize("chunk", [1 << 24, 1], ids=["one-chunk", "row-by-row"])
def test_weights_of_rows_equal_the_eager_rows(heads, kind, chunk, monkeypatch):
    monkeypatch.setattr(attention, "WEIGHTS_CHUNK", chunk)
    H, KV = heads
    B, T, hd = 2, 9, 8
    S = T if kind == "is_causal" else T + 3  # keys before the queries: a cache
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, H, T, hd, generator=g), torch.randn(B, KV, S, hd, generator=g), torch.randn(B, KV, S, hd)
    mask = _mask(kind, H, T, S, B)
    _, full = attention.scaled_dot_product_attention(q, k, v, mask, backend="eager", need_weights=True)
    rows = torch.tensor([8, 0, 3, 8])
    fast, part = attention.scaled_dot_product_attention(q, k, v, mask, need_weights=True, weight_rows=rows)
    assert part.shape == (B, H, 4, S)
    assert (part - full[:, :, rows]).abs().max().item() <= TOL
    plain, _ = attention.scaled_dot_product_attention(q, k, v, mask)
    assert torch.equal(fast, plain)  # the output still comes from the fast backend


def test_weight_rows_out_of_range_are_refused():
    q = k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        attention.scaled_dot_product_attention(q, k, v, need_weights=True, weight_rows=torch.tensor([4]))


def test_rows_are_computed_a_chunk_at_a_time(monkeypatch):
    """WEIGHTS_CHUNK bounds the float32 scores held at once: here 2 rows of 1 x 2 heads x 16 keys."""
    monkeypatch.setattr(attention, "WEIGHTS_CHUNK", 64)
    seen = []
    real = attention._weight_rows
    monkeypatch.setattr(attention, "_weight_rows", lambda *a, **kw: seen.append(a[4].numel()) or real(*a, **kw))
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    weights = attention_weights(q, k, AttentionMask(None, is_causal=True), 0.5, torch.arange(5))
    assert seen == [2, 2, 1]
    assert (weights - attention_weights(q, k, AttentionMask(None, is_causal=True), 0.5)[:, :, :5]).abs().max() <= TOL


# --- decoders: every attention variant, padding, caches --------------------------------------------

DECODERS = {
    "llama-gqa-6-2": ("tiny-llama", dict(d_model=48, n_heads=6, n_kv_heads=2)),  # RoPE, 3 query heads per kv head
    "llama-mqa": ("tiny-llama", dict(n_kv_heads=1)),
    "gpt2": ("tiny-gpt2", {}),  # learned positions, MHA, biases
    "alibi": ("tiny-llama", dict(position="alibi", n_kv_heads=4)),
    "mistral-window-8": ("tiny-mistral", dict(sliding_window=8)),
}


@pytest.fixture(params=sorted(DECODERS))
def decoder(request):
    preset, overrides = DECODERS[request.param]
    return tiny_model(preset, **overrides)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_decoder_rows_equal_eager_rows_and_the_output_stays_the_fast_paths(decoder, padded):
    ids = random_ids(decoder.config.vocab_size, 3, 24, seed=1)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        mask[2, :11] = 0
    with torch.no_grad():
        full = decoder(ids, attention_mask=mask, output_attentions=True)
        part = decoder(ids, attention_mask=mask, output_attentions=True, attention_rows=ROWS)
        plain = decoder(ids, attention_mask=mask)
    assert_rows_equal(full.attentions, part.attentions, ROWS)
    assert part.attentions[0].shape == (3, decoder.config.n_heads, len(ROWS), 24)
    assert torch.equal(part.logits, plain.logits)


@pytest.mark.parametrize("kind", ["dynamic", "static", "ring"])
def test_decoder_rows_after_a_cache_index_the_new_tokens(kind):
    """With 10 tokens cached, rows index the 6 new queries; the keys are those the forward attends
    to (all 16; a static cache's 16 slots written so far, for an eager chunk at consecutive slots;
    a sliding-window ring of 8 slots plus the 6 new)."""
    if kind == "ring":
        model = tiny_model("tiny-mistral", d_model=48, n_heads=6, n_kv_heads=2, sliding_window=8)
    else:
        model = tiny_model("tiny-llama", d_model=48, n_heads=6, n_kv_heads=2)
    ids = random_ids(model.config.vocab_size, 2, 16, seed=2)
    static = kind == "static"
    results = []
    for rows in (None, [-1, 2]):
        cache = model.new_cache(2, 32, static=static)
        pos = (lambda a, b: dict(input_pos=torch.arange(a, b))) if static else (lambda a, b: {})
        with torch.no_grad():
            model(ids[:, :10], cache=cache, **pos(0, 10))
            out = model(ids[:, 10:], cache=cache, output_attentions=True, attention_rows=rows, **pos(10, 16))
        results.append(out)
    full, part = results
    assert full.attentions[0].shape == (2, 6, 6, {"dynamic": 16, "static": 16, "ring": 14}[kind])
    assert_rows_equal(full.attentions, part.attentions, [-1, 2])
    assert (part.logits - full.logits).abs().max().item() <= 1e-4


def test_attention_layers_keep_the_layer_index_and_leave_the_others_none():
    model = tiny_model("tiny-llama", n_layers=3)
    ids = random_ids(model.config.vocab_size, 1, 12, seed=3)
    with torch.no_grad():
        full = model(ids, output_attentions=True)
        last = model(ids, output_attentions=True, attention_layers=[-1])  # no rows: full weights, that layer only
        some = model(ids, output_attentions=True, attention_layers=[0, 2], attention_rows=[3])
    assert last.attentions[:2] == (None, None)
    assert (last.attentions[2] - full.attentions[2]).abs().max().item() <= TOL
    assert some.attentions[1] is None
    assert_rows_equal(full.attentions[::2], some.attentions[::2], [3])


# --- encoders, encoder-decoders, ViT ----------------------------------------------------------------


def test_encoder_rows_with_padding():
    torch.manual_seed(0)
    model = Encoder(ModelConfig.from_name("tiny-bert")).eval()
    ids = random_ids(model.config.vocab_size, 3, 14, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, output_attentions=True)
        part = model(ids, attention_mask=mask, output_attentions=True, attention_rows=ROWS)
        plain = model(ids, attention_mask=mask)
    assert_rows_equal(full.attentions, part.attentions, ROWS)
    assert torch.equal(part.last_hidden_state, plain.last_hidden_state)


@pytest.mark.parametrize("preset", ["tiny-t5", "tiny-bart"])  # T5: relative-position bias in self-attention
def test_seq2seq_rows_in_encoder_decoder_and_cross_attention(preset):
    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig.from_name(preset)).eval()
    source = random_ids(model.config.vocab_size, 3, 11, seed=5)
    mask = torch.ones_like(source)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    target = random_ids(model.config.vocab_size, 3, 7, seed=6)
    kwargs = dict(attention_mask=mask, decoder_input_ids=target, output_attentions=True)
    with torch.no_grad():
        full = model(source, **kwargs)
        part = model(source, **kwargs, attention_rows=[-1, 2])
        last = model(source, **kwargs, attention_rows=[-1], attention_layers=[-1])
    for name in ("encoder_attentions", "attentions", "cross_attentions"):
        assert_rows_equal(getattr(full, name), getattr(part, name), [-1, 2])
    assert part.cross_attentions[0].shape == (3, 4, 2, 11)  # target rows x source
    assert last.cross_attentions[0] is None and last.attentions[0] is None
    assert (last.cross_attentions[-1] - full.cross_attentions[-1][:, :, -1:]).abs().max().item() <= TOL


def test_vit_rows_over_cls_and_patches():
    torch.manual_seed(0)
    cfg = ModelConfig(family="vit", d_model=48, n_layers=2, n_heads=6, d_ff=80, image_size=20, patch_size=4,
                      norm="layernorm", mlp="gelu", position="learned")  # fmt: skip
    model = VisionTransformer(cfg).eval()
    pixels = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(pixels, output_attentions=True)
        part = model(pixels, output_attentions=True, attention_rows=[0, -1])  # [CLS] and the last patch
    assert_rows_equal(full.attentions, part.attentions, [0, -1])
    assert part.attentions[0].shape == (2, 6, 2, 26)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(attention_rows=[12]), r"attention_rows \[12\] out of range.*12 query positions.*-12\.\.11"),
        (dict(attention_rows=[-13]), r"attention_rows \[-13\] out of range"),
        (dict(attention_rows=[]), "non-empty list of integers"),
        (dict(attention_rows=[1.5]), "non-empty list of integers"),
        (dict(attention_layers=[2]), r"attention_layers \[2\] out of range.*2 layers.*-2\.\.1"),
        (dict(attention_rows=[0], output_attentions=False), "pass output_attentions=True"),
        (dict(attention_layers=[0], output_attentions=False), "pass output_attentions=True"),
    ],
)
def test_bad_rows_and_layers_name_the_valid_range(kwargs, message):
    model = tiny_model("tiny-llama")
    ids = random_ids(model.config.vocab_size, 1, 12, seed=8)
    with pytest.raises(UsageError, match=message):
        model(ids, **{"output_attentions": True, **kwargs})


# --- memory: O(rows x keys), not O(T^2) ----------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


def test_rows_never_make_a_tensor_of_t_by_t():
    """At T=2048 the eager path makes [1, 4, T, T] weights (16.8M elements a layer); the rows path's
    largest tensor is the logits [1, T, 512] (1M), and no tensor anywhere has T x T elements."""
    T = 2048
    model = tiny_model("tiny-llama", max_seq_len=T)
    ids = random_ids(model.config.vocab_size, 1, T, seed=9)
    with torch.no_grad():
        with LargestTensor() as rows_path:
            part = model(ids, output_attentions=True, attention_rows=[-1, 0, 1000])
        with LargestTensor() as eager_path:
            full = model(ids, output_attentions=True, attention_layers=[0])
    assert eager_path.most >= 4 * T * T  # the probe sees the quadratic tensor when there is one
    assert rows_path.most < T * T
    assert (part.attentions[0] - full.attentions[0][:, :, [-1, 0, 1000]]).abs().max().item() <= TOL


# --- a real model -------------------------------------------------------------------------------


@pytest.mark.real
def test_smollm2_rows_equal_eager_rows_at_300_tokens():
    model = qkv.load("smollm2-135m-instruct", dtype=torch.float32)
    ids = random_ids(model.config.vocab_size, 1, 300, seed=10)
    rows, layers = [-1, 0, 150], [0, 14, -1]
    with torch.no_grad():
        full = model(ids, output_attentions=True, attention_layers=layers)
        part = model(ids, output_attentions=True, attention_layers=layers, attention_rows=rows)
    picked = [i % model.config.n_layers for i in layers]
    assert_rows_equal(tuple(full.attentions[i] for i in picked), tuple(part.attentions[i] for i in picked), rows)
    assert (part.logits - full.logits).abs().max().item() <= 1e-3


def test_clip_rows_apply_to_each_tower():
    from qkv.models.vision import CLIP, CLIPConfig

    text = ModelConfig(family="encoder", vocab_size=99, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16,
                       norm="layernorm", mlp="gelu", position="learned", eos_token_id=98)  # fmt: skip
    vision = ModelConfig(family="vit", d_model=48, n_layers=3, n_heads=6, d_ff=64, image_size=20, patch_size=5,
                         norm="layernorm", mlp="gelu", position="learned", norm_pooled_only=True)  # fmt: skip
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(text=text, vision=vision, projection_dim=24)).eval()
    ids = random_ids(99, 2, 9, seed=11)
    ids[:, -1] = 98
    pixels = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        full = model(ids, pixels, output_attentions=True)
        part = model(ids, pixels, output_attentions=True, attention_rows=[-1, 0])
        plain = model(ids, pixels)
    assert_rows_equal(full.text_output.attentions, part.text_output.attentions, [-1, 0])  # causal text tower
    assert_rows_equal(full.vision_output.attentions, part.vision_output.attentions, [-1, 0])
    assert part.vision_output.attentions[0].shape == (2, 6, 2, 17)
    assert torch.equal(part.logits_per_text, plain.logits_per_text)
