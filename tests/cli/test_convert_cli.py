"""`qkv convert SRC DST --to hf|qkv`: conversions that transformers and qkv read back with equal logits,
and destinations it refuses to overwrite."""

from __future__ import annotations

import json

import pytest
import torch

import qkv
from oracle import make_hf_model
from qkv.cli.main import main

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny random LLaMA (GQA 6/2, untied) saved by transformers -> (model, directory)."""
    hf = make_hf_model("llama-gqa-6-2")
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


@pytest.mark.parametrize("name", ["llama-gqa-6-2", "llama-mqa-tied", "gpt2"])
def test_hf_to_qkv_to_hf_round_trip(tmp_path, name, capsys):
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "native"), "--to", "qkv"]) == 0
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--to", "hf"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "native"), str(tmp_path / "back")]
    assert json.loads((tmp_path / "native" / "config.json").read_text())["format"] == "qkv"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = logits(hf, ids)
    assert (logits(back, ids) - expected).abs().max() <= TOL
    assert (logits(qkv.load(tmp_path / "native"), ids) - expected).abs().max() <= TOL


def test_dtype_for_a_qkv_checkpoint(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir[1]), str(tmp_path / "bf16"), "--to", "qkv", "--dtype", "bfloat16"]) == 0
    assert {p.dtype for p in qkv.load(tmp_path / "bf16").parameters()} == {torch.bfloat16}
    assert main(["convert", str(hf_dir[1]), str(tmp_path / "x"), "--to", "hf", "--dtype", "bfloat16"]) == 2
    assert "--to hf writes float32 weights" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_replaces_a_checkpoint_of_the_same_format(hf_dir, tmp_path):
    dst = tmp_path / "out"
    assert main(["convert", str(hf_dir[1]), str(dst), "--to", "qkv"]) == 0
    assert main(["convert", str(hf_dir[1]), str(dst), "--to", "qkv", "--dtype", "float16"]) == 0
    assert qkv.load(dst).lm_head.weight.dtype == torch.float16
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(dst), str(tmp_path / "empty"), "--to", "hf"]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


NOTES = {"notes.txt": "keep me"}


@pytest.mark.parametrize(
    "files, to, message",
    [
        (NOTES, "hf", "a non-empty directory that is not a Hugging Face checkpoint"),
        (NOTES, "qkv", "a non-empty directory that is not a qkv checkpoint"),
        ({"config.json": '{"format": "qkv"}'}, "hf", "not a Hugging Face checkpoint"),
    ],
    ids=["other-dir-hf", "other-dir-qkv", "qkv-checkpoint-as-hf"],
)
def test_refuses_to_overwrite_what_is_not_a_checkpoint_of_that_format(hf_dir, tmp_path, capsys, files, to, message):
    dst = tmp_path / "dst"
    dst.mkdir()
    for name, text in files.items():
        (dst / name).write_text(text)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    assert main(["convert", str(hf_dir[1]), str(dst), "--to", to]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qkv convert: error: refusing to replace {dst}: ") and message in err
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "hf"]  # no temporary directory left


def test_refuses_a_file_the_source_itself_and_a_missing_source(hf_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["convert", str(hf_dir[1]), str(tmp_path / "file"), "--to", "qkv"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"
    assert main(["convert", str(hf_dir[1]), str(hf_dir[1]), "--to", "hf"]) == 2
    assert "is the source itself" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "absent"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "is not a known model name" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.real
def test_smollm2_gguf_to_hf_loads_in_transformers_with_equal_logits(tmp_path, capsys):
    """The real SmolLM2 GGUF (Q4_1, dequantized) -> HF directory -> transformers: the same logits as qkv."""
    pytest.importorskip("accelerate")
    dst = tmp_path / "smollm2-hf"
    assert main(["convert", "smollm2-135m-instruct", str(dst), "--to", "hf"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]  # fmt: skip
    ours = qkv.load("smollm2-135m-instruct", dequantize=True)  # float32, as convert reads it
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(dst)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == prompt
    ids = torch.tensor([prompt + list(range(1000, 1032))])
    assert (logits(theirs, ids) - logits(ours, ids)).abs().max() <= TOL


# -- --quantize ------------------------------------------------------------------------------------
@pytest.fixture
def dense_qkv(tmp_path):
    """A tiny random LLaMA (tied head; every input size a multiple of 32) as a float32 qkv checkpoint."""
    from tiny_models import tiny_model

    model = tiny_model("tiny-llama", vocab_size=96, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=128,
                       tie_embeddings=True)  # fmt: skip
    return qkv.checkpoints.native.save_native(model, tmp_path / "dense")


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantize_writes_a_checkpoint_that_loads_quantized(dense_qkv, tmp_path, capsys, scheme):
    from qkv.nn.quant import QuantLinear, prepare_model, quantize_model, quantized_modules

    dst = tmp_path / scheme
    assert main(["convert", str(dense_qkv), str(dst), "--to", "qkv", "--quantize", scheme]) == 0
    assert f"quantizing to {scheme}: 9/9 linear layers" in capsys.readouterr().err
    loaded = qkv.load(dst)
    layout = quantized_modules(loaded)
    assert len(layout) == 9 and isinstance(loaded.lm_head, QuantLinear)  # 4 per block, and the (tied) head
    assert {spec["bits"] for name, spec in layout.items() if name != "lm_head"} == {int(scheme[3:])}
    assert layout["lm_head"] == {"bits": 8, "group_size": 32}  # the head: group-wise int8 either way
    assert json.loads((dst / "config.json").read_text())["quantization"] == layout
    expected = quantize_model(qkv.load(dense_qkv, dequantize=True), scheme).to(torch.bfloat16)
    expected.rope.reset_buffers()  # .to() rounded the RoPE frequencies to bfloat16; a load computes them in float32
    prepare_model(expected)  # as qkv.load does: packed kernels, and the tied head's dense twin
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(loaded, ids), logits(expected, ids))
    assert loaded.embed.tokens.weight.dtype == torch.bfloat16


def test_quantize_keeps_dtype_and_reports_dense_layers(hf_dir, tmp_path, capsys):
    """int4 groups of 32 do not divide this model's 48 inputs: no layer quantizes, which is an error;
    int8 (per channel) quantizes them all, and --dtype sets the rest."""
    assert main(["convert", str(hf_dir[1]), str(tmp_path / "q4"), "--to", "qkv", "--quantize", "int4"]) == 2
    assert "no linear layer of this model can be quantized" in capsys.readouterr().err
    assert not (tmp_path / "q4").exists()
    dst = tmp_path / "q8"
    assert main(["convert", str(hf_dir[1]), str(dst), "--to", "qkv", "--quantize", "int8", "--dtype", "float32"]) == 0
    loaded = qkv.load(dst)
    assert loaded.embed.tokens.weight.dtype == torch.float32 and loaded.blocks[0].mlp.up.scales.dtype == torch.float32
    assert loaded.lm_head.weight.dtype == torch.float32  # the head's int8 groups of 32 do not divide 48: dense
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(1))
    assert (logits(loaded, ids) - logits(hf_dir[0], ids)).abs().max() < 0.05  # int8: close to the dense model


def test_quantize_with_to_hf_is_refused(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir[1]), str(tmp_path / "x"), "--to", "hf", "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--quantize int8 writes a qkv checkpoint" in err and "use --to qkv" in err
    assert not (tmp_path / "x").exists()


def test_a_quantized_checkpoint_converts_to_hf_dense(dense_qkv, tmp_path):
    """A quantized SRC is dequantized on load, so --to hf works from it."""
    assert main(["convert", str(dense_qkv), str(tmp_path / "q"), "--to", "qkv", "--quantize", "int8"]) == 0
    assert main(["convert", str(tmp_path / "q"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(2))
    assert (logits(back, ids) - logits(qkv.load(tmp_path / "q", dequantize=True), ids)).abs().max() <= TOL
