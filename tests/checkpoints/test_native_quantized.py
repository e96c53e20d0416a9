"""Quantized native checkpoints: QuantLinears saved as their stored form, the layout recorded in
config.json, read back bit for bit; hostile layouts and tensors refused; no export to HF."""

import json

import pytest
import torch
from safetensors import safe_open

import qkv
from checkpoint_edits import edit_config, edit_weights
from qkv.checkpoints.hf import export_hf
from qkv.checkpoints.native import load_native, save_native
from qkv.errors import CheckpointError, UsageError
from qkv.nn.quant import QuantLinear, dequantize_model, quantize_model, quantized_modules
from tiny_models import random_ids, tiny_model

TINY = dict(vocab_size=96, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=128, max_seq_len=32)
IDS = random_ids(96, 2, 12, seed=0, low=0)


def quantized(scheme: str, tied: bool = True) -> qkv.DecoderLM:
    return quantize_model(tiny_model("tiny-llama", **TINY, tie_embeddings=tied), scheme)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(params=["int4", "int8"])
def saved(request, tmp_path):
    model = quantized(request.param)
    return model, save_native(model, tmp_path / "ckpt")


def test_round_trip_gives_bit_identical_logits(saved):
    model, path = saved
    loaded = load_native(path)
    assert quantized_modules(loaded) == quantized_modules(model)
    stored, back = model.state_dict(), loaded.state_dict()  # the stored form (a layer may hold a kernel form)
    assert all(torch.equal(back[k], v) for k, v in stored.items() if k.rpartition(".")[0] in quantized_modules(model))
    assert torch.equal(logits(loaded), logits(model))


def test_config_json_records_the_layout(saved):
    model, path = saved
    data = json.loads((path / "config.json").read_text())
    assert data["quantization"] == quantized_modules(model)
    bits = next(iter(data["quantization"].values()))["bits"]
    assert "lm_head" in data["quantization"] and len(data["quantization"]) == 2 * 4 + 1
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("blocks.0.mlp.down.qweight").dtype == (torch.uint8 if bits == 4 else torch.int8)
        assert f.get_tensor("blocks.0.mlp.down.scales").dtype == torch.float32
    assert "lm_head.weight" not in names and "embed.tokens.weight" in names and "lm_head.qweight" in names


def test_a_dense_checkpoint_has_no_quantization_entry(tmp_path):
    path = save_native(tiny_model("tiny-llama", **TINY), tmp_path / "dense")
    assert "quantization" not in json.loads((path / "config.json").read_text())


def test_a_quantized_tied_head_is_not_tied_again(saved):
    loaded = load_native(saved[1])
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.embed.tokens.weight.dtype == torch.float32


def test_an_untied_model_round_trips(tmp_path):
    model = quantized("int4", tied=False)
    assert torch.equal(logits(load_native(save_native(model, tmp_path / "c"))), logits(model))


def test_dtype_casts_the_rest_but_not_the_stored_form(saved):
    model, path = saved
    loaded = load_native(path, dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    stored, back = model.lm_head.state_dict(), loaded.lm_head.state_dict()
    assert back["qweight"].dtype in (torch.uint8, torch.int8) and back["scales"].dtype == torch.float32
    assert all(torch.equal(back[k], v) for k, v in stored.items())
    assert logits(loaded).dtype == torch.bfloat16


def test_partly_quantized_model_round_trips(tmp_path):
    model = quantize_model(
        tiny_model("tiny-llama", **TINY, tie_embeddings=True), "int8", targets=["blocks.1.attn.o_proj"]
    )
    loaded = load_native(save_native(model, tmp_path / "c"))
    assert quantized_modules(loaded) == {"blocks.1.attn.o_proj": {"bits": 8, "group_size": None}}
    assert loaded.lm_head.weight is loaded.embed.tokens.weight  # the dense tied head stays tied
    assert torch.equal(logits(loaded), logits(model))


def test_export_hf_of_a_quantized_model_says_to_dequantize(saved, tmp_path):
    model, _ = saved
    with pytest.raises(UsageError, match=r"dequantize it first.*dequantize_model.*dequantize=True"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_hf(dequantize_model(model), tmp_path / "hf")  # and after dequantizing, it exports
    assert (tmp_path / "hf" / "model.safetensors").is_file()


# -- hostile edits ---------------------------------------------------------------------------------
def edit_layout(path, change):
    edit_config(path, lambda data: change(data["quantization"]))


def retype(name, dtype):
    return lambda t: t.update({name: t[name].to(dtype)})


BAD = {
    "unknown module": (lambda q: q.update({"blocks.9.attn.o": {"bits": 4, "group_size": 32}}),
                       r"'blocks\.9\.attn\.o' does not name a linear layer of the model \(no such module\)"),
    "not a linear": (lambda q: q.update({"norm": q.pop("lm_head")}), r"'norm' does not name a linear layer.*RMSNorm"),
    "bits=3": (lambda q: q["lm_head"].update(bits=3), r"'lm_head' has bits=3; qkv stores 4 or 8"),
    "bits not int": (lambda q: q["lm_head"].update(bits="4"), r"'lm_head' has bits='4'"),
    "group does not divide": (lambda q: q["lm_head"].update(group_size=48),
                              r"'lm_head' has group_size=48.*in_features=64"),
    "group zero": (lambda q: q["lm_head"].update(group_size=0), r"'lm_head' has group_size=0"),
    "extra key": (lambda q: q["lm_head"].update(sym=True), r"'lm_head' must be"),
    "not an object": (lambda q: q.update(lm_head=4), r"'lm_head' must be"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_a_hostile_layout_names_the_file_and_the_entry(saved, case):
    _, path = saved
    change, message = BAD[case]
    edit_layout(path, change)
    with pytest.raises(CheckpointError, match=r"config\.json: \"quantization\" entry " + message):
        load_native(path)


def test_a_layout_that_is_not_an_object(saved):
    _, path = saved
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "quantization": ["lm_head"]}))
    with pytest.raises(CheckpointError, match=r"config\.json: \"quantization\" must be an object"):
        load_native(path)


def test_a_changed_layout_no_longer_matches_the_tensors(saved):
    model, path = saved
    bits = model.lm_head.bits
    edit_layout(path, lambda q: q["lm_head"].update(bits=12 - bits, group_size=32))  # int4 <-> int8
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*lm_head\."):
        load_native(path)


def test_a_dropped_layout_entry_leaves_unexpected_tensors(saved):
    _, path = saved
    edit_layout(path, lambda q: q.pop("blocks.0.mlp.up"))
    with pytest.raises(CheckpointError, match=r"missing tensors: blocks\.0\.mlp\.up\.weight.*unexpected"):
        load_native(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (retype("blocks.0.attn.o_proj.qweight", torch.int16), r"attn\.o_proj\.qweight is I16 in the file"),
        (retype("blocks.0.attn.o_proj.scales", torch.bfloat16), r"attn\.o_proj\.scales is BF16 in the file.*F32"),
        (lambda t: t.update({"lm_head.scales": t["lm_head.scales"][:, :1].clone()}),
         r"wrong shape: lm_head\.scales is \(96, 1\) in the file, the model needs \(96, 2\)"),
    ],
    ids=["qweight-dtype", "scales-dtype", "scales-shape"],
)  # fmt: skip
def test_wrong_quantized_tensors_are_refused(tmp_path, change, message):
    path = save_native(quantized("int4"), tmp_path / "c")
    edit_weights(path, change)
    with pytest.raises(CheckpointError, match=message):
        load_native(path)


def test_int8_weights_stored_as_uint8_are_refused(tmp_path):
    path = save_native(quantized("int8"), tmp_path / "c")
    edit_weights(path, retype("lm_head.qweight", torch.uint8))
    with pytest.raises(CheckpointError, match=r"lm_head\.qweight is U8 in the file, int8 stores I8"):
        load_native(path)
