"""Hugging Face checkpoint directories: load what `transformers` saved, export what it loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from oracle import HF_CONFIGS, make_hf_model
from qkv import DecoderLM, ModelConfig
from qkv.checkpoints.hf import export_hf, load_hf

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def _ids(vocab: int, length: int = 24) -> torch.Tensor:
    return torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_load_save_pretrained_matches_logits_and_greedy(name, tmp_path):
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= TOL
    eos = model.config.eos_token_id
    ref = hf.generate(ids[:1, :8], max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert model.generate(ids[:1, :8], max_new_tokens=16).tolist() == ref.tolist()


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model("llama-gqa-6-2")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_hf(tmp_path)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= TOL


def test_bfloat16_load(tmp_path):
    """In bfloat16, qkv is as close to the float32 logits as transformers in bfloat16 is (the logits'
    std is ~0.2 and bfloat16 moves them by ~0.005: a fixed tolerance of 0.1 would only check the dtype)."""
    hf = make_hf_model("llama-gqa-6-2")
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = (model(ids).logits.float() - ref).abs().max().item()
        theirs = (copy.deepcopy(hf).to(torch.bfloat16)(ids).logits.float() - ref).abs().max().item()
    assert 0 < ours <= 2 * theirs, (ours, theirs)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_pytorch_model_bin(tmp_path, zip_format):
    """A state dict in pytorch_model.bin (what save_pretrained wrote before safetensors; transformers 5
    writes safetensors only, so torch.save writes it here) loads, read with weights_only=True."""
    hf = make_hf_model("llama-gqa-6-2")
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    model = load_hf(tmp_path)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-mistral"])
def test_export_roundtrip_through_transformers(preset, tmp_path):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name(preset)).eval()
    export_hf(model, tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(model.config.vocab_size, 40)
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max().item() <= TOL
    again = load_hf(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_export_rejects_inexpressible_config(tmp_path):
    model = DecoderLM(ModelConfig.from_name("tiny-llama", position="alibi"))
    with pytest.raises(ValueError, match="native format"):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_replaces_existing_atomically(tmp_path):
    model = DecoderLM(ModelConfig.from_name("tiny-llama")).eval()
    out = tmp_path / "hf"
    export_hf(model, out)
    export_hf(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_export_refuses_to_replace_other_files(tmp_path):
    model = DecoderLM(ModelConfig.from_name("tiny-llama")).eval()
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
        export_hf(model, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
