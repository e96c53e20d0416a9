"""`qkv lora merge`: base + PEFT adapter -> a plain checkpoint (qkv or HF) whose logits are the
adapted model's, as PEFT computes them; quantized bases; refusals."""

from __future__ import annotations

import pytest
import torch
from tests.tiny_models import peft_adapter

import qkv
from cli_run import qkv as run
from oracle import make_hf_model
from qkv.formats.safetensors import SafetensorsFile
from qkv.nn.lora import LoraConfig, apply_lora, lora_parameters, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


@pytest.fixture
def base_and_adapter(tmp_path):
    """A tiny random LLaMA saved by transformers, a PEFT adapter on q/v/down saved by peft, and the
    adapted model's logits on `ids` as PEFT computes them."""
    hf = make_hf_model("llama-gqa-6-2")
    hf.save_pretrained(tmp_path / "base")
    peft_model = peft_adapter(hf, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8, seed=5)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
    return tmp_path / "base", tmp_path / "adapter", ids, expected


@pytest.mark.parametrize("to", ["qkv", "hf"])
def test_merge_writes_a_plain_checkpoint_with_the_adapted_logits(base_and_adapter, tmp_path, capsys, to):
    base, adapter, ids, expected = base_and_adapter
    out = tmp_path / "merged"
    code, stdout, stderr = run(capsys, "lora", "merge", "--base", base, "--adapter", adapter, "--out", out, "--to", to)
    assert code == 0, stderr
    assert stdout.strip() == str(out) and "r=4 alpha=8 on 6 projections" in stderr
    assert not any("lora" in name for name in SafetensorsFile(out / "model.safetensors").names())
    if to == "hf":
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            got = model(input_ids=ids).logits
    else:
        with torch.no_grad():
            got = qkv.load(out)(ids).logits
    assert (got - expected).abs().max() <= TOL


def test_merge_onto_a_quantized_base_makes_the_covered_layers_dense(base_and_adapter, tmp_path, capsys):
    base, _, ids, _ = base_and_adapter
    code, _, err = run(capsys, "convert", base, tmp_path / "int8", "--to", "qkv", "--quantize", "int8",
                       "--dtype", "float32")  # fmt: skip
    assert code == 0, err
    model = qkv.load(tmp_path / "int8")
    apply_lora(model, LoraConfig(rank=2, targets=("o",)))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    code, _, stderr = run(capsys, "lora", "merge", "--base", tmp_path / "int8", "--adapter", tmp_path / "adapter",
                          "--out", out)  # fmt: skip
    assert code == 0, stderr
    assert "2 quantized layers the adapter covers are dense after merging" in stderr
    merged = qkv.load(out)
    assert type(merged.blocks[0].attn.o_proj).__name__ == "Linear"
    assert type(merged.blocks[0].attn.qkv_proj).__name__ == "QuantLinear"  # not covered: still packed
    with torch.no_grad():
        assert (merged(ids).logits - expected).abs().max() <= TOL


def test_merge_refusals(base_and_adapter, tmp_path, capsys):
    base, adapter, _, _ = base_and_adapter
    code, _, err = run(
        capsys, "lora", "merge", "--base", base, "--adapter", tmp_path / "nowhere", "--out", tmp_path / "o"
    )
    assert code == 2 and "no adapter_config.json" in err and not (tmp_path / "o").exists()
    code, _, err = run(capsys, "lora", "merge", "--base", base, "--adapter", adapter, "--out", adapter)
    assert code == 2 and "is the adapter itself" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = run(capsys, "lora", "merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "mine")
    assert code == 2 and "refusing to replace" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    make_hf_model("gpt2").save_pretrained(tmp_path / "gpt2")
    code, _, err = run(
        capsys, "lora", "merge", "--base", tmp_path / "gpt2", "--adapter", adapter, "--out", tmp_path / "o"
    )
    assert (
        code == 2
        and "model.layers.0.mlp.down_proj.lora_A.weight is for module" in err
        and "another architecture" in err
    )
    assert not (tmp_path / "o").exists()
