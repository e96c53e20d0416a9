"""GGUF loading against Hugging Face transformers.

Each test writes a GGUF file from a tiny random `LlamaForCausalLM` the way llama.cpp's
`convert_hf_to_gguf.py` does (its tensor names, its Q/K row permutation, its metadata keys),
stores the weights in one tensor type, and checks that qkv's logits equal those of
`transformers` loading the same file, and, for F32 files, those of the original model.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from qkv import kernels
from qkv.checkpoints import gguf as gguf_loader
from qkv.checkpoints.gguf import config_from_gguf, is_gguf_file, load_gguf, read_gguf, unpermute_rope_rows
from qkv.nn.packed_embedding import TiedPackedEmbedding
from qkv.nn.quant import QuantLinear, prepare_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

Q = gguf.GGMLQuantizationType
TOL = 1e-4

_BASE = dict(
    vocab_size=97, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip
# Rows of 96/160 suit the 32-wide blocks; K-quants need rows that are multiples of 256.
CONFIGS: dict[str, dict] = {
    "gqa-6-2": _BASE,
    "mqa-tied": {**_BASE, "num_key_value_heads": 1, "tie_word_embeddings": True},
    "k-quants": {**_BASE, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8},
    "bias-head-dim-32": {**_BASE, "head_dim": 32, "attention_bias": True, "mlp_bias": True},
    # every linear (fused Q/K/V 256, gate+up 384, the head 128) in whole 64-row blocks of the int4 layout
    "blocks-of-64": {**_BASE, "vocab_size": 128, "hidden_size": 128, "intermediate_size": 192,
                     "num_attention_heads": 4},
    "blocks-of-64-tied": {**_BASE, "vocab_size": 128, "hidden_size": 128, "intermediate_size": 192,
                          "num_attention_heads": 4, "tie_word_embeddings": True},
    "rope-linear": {**_BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
    "rope-llama3": {**_BASE, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}},
    "rope-yarn": {**_BASE, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}},
}  # fmt: skip
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Where each K-quant block keeps its float16 super-scale(s) (gguf.quants' block layouts), and a
# typical value that gives weights of std ~0.03.
_K_SCALES = {Q.Q2_K: ((80, 84), 2e-3), Q.Q3_K: ((108, 110), 6e-4), Q.Q4_K: ((0, 4), 1.2e-4),
             Q.Q5_K: ((0, 4), 6e-5), Q.Q6_K: ((208, 210), 2e-5)}  # fmt: skip


def make_hf_llama(name: str, seed: int = 0):
    """A tiny random LlamaForCausalLM with every weight perturbed away from its init."""
    config = transformers.LlamaConfig(**CONFIGS[name])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """`rope_freqs.weight` as convert_hf_to_gguf.py computes it for rope_type llama3."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def random_k_quant(shape: tuple[int, ...], qtype, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a K-quant type (gguf has no Python K-quantizer) with small, finite scales."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (math.prod(shape) // block, type_size), dtype=np.uint8)
    (lo, hi), typical = _K_SCALES[qtype]
    scales = rng.uniform(typical / 2, typical * 1.5, (blocks.shape[0], (hi - lo) // 2)).astype(np.float16)
    blocks[:, lo:hi] = scales.view(np.uint8)
    return blocks.reshape(*shape[:-1], -1)


def encode(data: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    if qtype in K_QUANTS:
        return random_k_quant(data.shape, qtype, rng)
    return gguf.quants.quantize(data, qtype)


def write_gguf(hf, path, qtype=Q.F32) -> None:
    """`hf` as llama.cpp's converter writes it: 2-D weights in `qtype`, norms in F32."""
    c = hf.config
    rope = c.rope_parameters
    head_dim = c.head_dim
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    rng = np.random.default_rng(0)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # the converter writes no output.weight for tied models
        data = tensor.float().numpy()
        if ".q_proj." in name:
            data = llama_cpp_permute(data, c.num_attention_heads, c.num_attention_heads)
        elif ".k_proj." in name:
            data = llama_cpp_permute(data, c.num_attention_heads, c.num_key_value_heads)
        kind = qtype if data.ndim == 2 else Q.F32
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), encode(data, kind, rng), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _ids(vocab: int, batch: int = 2, length: int = 40) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def gguf_file(tmp_path):
    """Write `name`'s model in `qtype` -> (HF model, path)."""

    def write(name: str, qtype=Q.F32):
        hf = make_hf_llama(name)
        path = tmp_path / f"{name}.{qtype.name}.gguf"
        write_gguf(hf, path, qtype)
        return hf, path

    return write


@pytest.mark.parametrize("n_head, n_head_kv", [(6, 6), (6, 2), (9, 3), (4, 1)])
def test_unpermute_inverts_llama_cpp_permute(n_head, n_head_kv):
    rows = n_head_kv * 16
    w = torch.randn(rows, 24)
    stored = torch.from_numpy(llama_cpp_permute(w.numpy(), n_head, n_head_kv))
    assert not torch.equal(stored, w)
    assert torch.equal(unpermute_rope_rows(stored, n_head_kv), w)
    bias = torch.randn(rows)
    stored_bias = torch.from_numpy(llama_cpp_permute(bias.numpy(), n_head_kv, None))
    assert torch.equal(unpermute_rope_rows(stored_bias, n_head_kv), bias)


@pytest.mark.parametrize(
    "name, qtype",
    [("gqa-6-2", q) for q in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)]
    + [("mqa-tied", Q.Q8_0)]
    + [("k-quants", q) for q in K_QUANTS],
    ids=lambda v: getattr(v, "name", v),
)
def test_logits_match_transformers_gguf_loader(gguf_file, name, qtype):
    _, path = gguf_file(name, qtype)
    model = load_gguf(path, dequantize=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        diff = (model(ids).logits - ref.eval()(ids).logits).abs().max().item()
    assert diff <= TOL, (name, qtype.name, diff)


@pytest.mark.parametrize("name", ["gqa-6-2", "mqa-tied", "bias-head-dim-32", "rope-linear", "rope-llama3", "rope-yarn"])
def test_f32_file_matches_original_model(gguf_file, name):
    hf, path = gguf_file(name)
    model = load_gguf(path, dequantize=True)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= TOL, (name, diff)


@pytest.mark.parametrize("name", ["gqa-6-2", "mqa-tied", "bias-head-dim-32", "rope-llama3"])
def test_config_from_metadata(gguf_file, name):
    hf, path = gguf_file(name)
    cfg, c = config_from_gguf(read_gguf(path)), hf.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.d_ff) == (97, c.hidden_size, 2, c.intermediate_size)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    assert (cfg.norm, cfg.mlp, cfg.position, cfg.max_seq_len) == ("rmsnorm", "swiglu", "rope", 64)
    assert cfg.rope_theta == c.rope_parameters["rope_theta"]
    assert cfg.norm_eps == pytest.approx(c.rms_norm_eps)
    assert cfg.tie_embeddings == c.tie_word_embeddings
    assert cfg.qkv_bias == cfg.attn_out_bias == cfg.mlp_bias == bool(c.attention_bias)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    if name == "rope-llama3":
        assert cfg.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}  # fmt: skip


def test_loaded_model_is_materialized_and_tied(gguf_file):
    _, path = gguf_file("mqa-tied", Q.Q8_0)
    model = load_gguf(path, dequantize=True)
    assert not model.training
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.embed.tokens.weight
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert torch.allclose(model.rope.inv_freq, inv_freq)
    assert model.tokenizer is None  # the tiny file carries no vocabulary


def test_is_gguf_file(gguf_file, tmp_path):
    _, path = gguf_file("gqa-6-2")
    renamed = path.rename(tmp_path / "model.bin")
    assert is_gguf_file(renamed)
    (tmp_path / "broken.gguf").write_bytes(b"not gguf")  # by name: load_gguf then explains what is wrong
    assert is_gguf_file(tmp_path / "broken.gguf")
    (tmp_path / "config.json").write_text("{}")
    assert not is_gguf_file(tmp_path / "config.json")
    assert not is_gguf_file(tmp_path)


def test_bfloat16(gguf_file):
    """In bfloat16, qkv is as close to the float32 logits as transformers in bfloat16 is (a fixed
    tolerance would be ~20 times bfloat16's error on these logits, so it would only check the dtype)."""
    hf, path = gguf_file("gqa-6-2")
    model = load_gguf(path, dtype="bfloat16", dequantize=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope.inv_freq.dtype == torch.float32  # frequencies stay exact, as in HF
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = (model(ids).logits.float() - ref).abs().max().item()
        theirs = (copy.deepcopy(hf).to(torch.bfloat16)(ids).logits.float() - ref).abs().max().item()
    assert 0 < ours <= 2 * theirs, (ours, theirs)


def test_greedy_generation_matches_transformers(gguf_file):
    _, path = gguf_file("gqa-6-2", Q.Q4_0)
    model = load_gguf(path, dequantize=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    prompt = _ids(model.config.vocab_size, 1, 5)
    ours = model.generate(prompt, max_new_tokens=20)
    theirs = ref.eval().generate(prompt, max_new_tokens=20, do_sample=False)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize(
    "name, qtype",
    [("gqa-6-2", q) for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1)] + [("mqa-tied", Q.Q4_1), ("bias-head-dim-32", Q.Q4_0)],
    ids=lambda v: getattr(v, "name", v),
)
def test_packed_load_keeps_the_files_values_exactly(gguf_file, name, qtype):
    """Q4_0/Q4_1/Q8_0 linears load as QuantLinears whose stored form is the file's own blocks: they
    dequantize bit for bit to what the dense loader gets, RoPE rows un-permuted alike; the rest is
    dense. A tied head is its own packed copy of the embeddings' blocks."""
    _, path = gguf_file(name, qtype)
    packed, dense = load_gguf(path, dtype="float32"), load_gguf(path, dequantize=True)
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, QuantLinear)}
    assert "blocks.0.attn.qkv_proj" in layers and "blocks.1.mlp.down" in layers
    bits = 8 if qtype == Q.Q8_0 else 4
    for module_name, layer in layers.items():
        assert layer.bits in (bits, 8) and layer.group_size == 32  # token_embd may be written as Q8_0
        assert torch.equal(layer.dequantize(), dense.get_submodule(module_name).weight), module_name
    assert ("lm_head" in layers) == (qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1))
    assert packed.embed.tokens.weight.dtype == torch.float32
    torch.testing.assert_close(packed.embed.tokens.weight, dense.embed.tokens.weight, atol=0, rtol=0)
    ids = _ids(packed.config.vocab_size)
    with torch.no_grad():
        # float32 activations take the dequantize path: the same numbers as the dense model
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-5)
        bf16 = load_gguf(path)(ids).logits.float()  # default: bfloat16 through the packed kernels
        ref = dense(ids).logits
    assert (bf16 - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize(
    "name, qtype",
    [("blocks-of-64", q) for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1)] + [("blocks-of-64-tied", Q.Q4_1), ("gqa-6-2", Q.Q4_1)],
    ids=lambda v: getattr(v, "name", v),
)
def test_kernel_form_straight_from_the_file_equals_the_repacked_stored_form(gguf_file, name, qtype, monkeypatch):
    """A bfloat16 load writes each packed layer's kernel form straight from the file's blocks
    (`kernel_form`, qkv/kernels/gguf_int4.c): byte for byte what preparing the stored form builds,
    scales and zeros exactly the stored ones, and so the same logits. Layers without whole 64-row
    blocks (gqa-6-2's fused Q/K/V of 160 rows) keep the stored path."""
    if kernels.library("gguf_int4") is None:
        pytest.skip(f"the packing kernel is not built here: {kernels.unavailable('gguf_int4')}")
    _, path = gguf_file(name, qtype)
    direct = load_gguf(path)
    adopted = {n for n, m in direct.named_modules() if isinstance(m, QuantLinear) and m._kernel is not None}
    monkeypatch.setattr(gguf_loader, "kernel_form", lambda *args, **kwargs: None)
    repacked = load_gguf(path)
    assert not any(m._kernel for m in repacked.modules() if isinstance(m, QuantLinear))
    prepare_model(direct), prepare_model(repacked)
    layers = {n: m for n, m in repacked.named_modules() if isinstance(m, QuantLinear)}
    whole = {n for n, m in layers.items() if m.out_features % 64 == 0}
    assert adopted == whole and whole, (adopted, whole)
    if name.startswith("blocks"):
        assert whole == set(layers) and "lm_head" in whole
    for module_name, theirs in layers.items():
        ours = direct.get_submodule(module_name)
        assert ours._released == theirs._released
        for a, b in zip(ours._kernel, theirs._kernel, strict=True):
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), module_name
            else:
                assert a == b, module_name
        assert torch.equal(ours.scales, theirs.scales)
        assert (ours.zeros is None and theirs.zeros is None) or torch.equal(ours.zeros, theirs.zeros)
        assert torch.equal(ours.values(), theirs.values())  # the stored values come back from the kernel form
    ids = _ids(repacked.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, repacked(ids).logits)


def test_packed_load_dequantizes_other_types(gguf_file):
    _, path = gguf_file("gqa-6-2", Q.Q5_0)
    model = load_gguf(path)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_tied_packed_head_holds_the_only_copy_of_the_table(gguf_file, qtype):
    """A tied file's one table is held once, packed in the head: the embedding lookup reads its
    rows from there, equal bit for bit to the dense table, so the logits are the same as with it."""
    _, path = gguf_file("blocks-of-64-tied", qtype)
    model = load_gguf(path)
    assert isinstance(model.embed.tokens, TiedPackedEmbedding) and model.embed.tokens.head is model.lm_head
    vocab = model.config.vocab_size
    assert not any(p.dim() == 2 and p.shape[0] == vocab for p in model.parameters())  # no dense table anywhere
    dense = load_gguf(path, dtype="bfloat16", dequantize=True)
    assert torch.equal(model.embed.tokens.weight, dense.embed.tokens.weight)
    assert torch.equal(model.state_dict()["embed.tokens.weight"], dense.embed.tokens.weight)
    ids = _ids(vocab)
    with torch.no_grad():
        looked_up = model(ids).logits
        model.embed.tokens = torch.nn.Embedding.from_pretrained(dense.embed.tokens.weight)
        assert torch.equal(looked_up, model(ids).logits)
