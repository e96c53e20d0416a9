"""`qkv generate`: prints what the library's `complete()` returns; bad input is a one-line error, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cli_run import qkv
from qkv.generation.text import complete
from qkv.loading import load
from tiny_checkpoint import save_tiny_checkpoint

PROMPT = "The quick brown"
CORPUS = ["The quick brown fox jumps over the lazy dog."] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random DecoderLM + trained byte-level BPE, saved natively. The head never favours
    single-byte tokens (their logits are 0), so greedy text is readable, multi-character tokens."""
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("generate") / "tiny", CORPUS, 64)
    assert load(path).tokenizer.encode("") == []  # no BOS is added: an empty prompt stays empty
    return path


@pytest.fixture(scope="module")
def library(checkpoint):
    """What the library makes of the same checkpoint: (model, tokenizer, greedy Completion)."""
    model = load(checkpoint)
    return model, model.tokenizer, complete(model, model.tokenizer, PROMPT, max_new_tokens=12)


def test_greedy_equals_complete(checkpoint, library, capsys):
    _, _, ref = library
    assert ref.finish_reason == "length" and len(ref.token_ids) == 12 and "\ufffd" not in ref.text
    assert qkv(capsys, "generate", checkpoint, "--prompt", PROMPT, "-n", 12) == (0, ref.text + "\n", "")


def test_compiled_decoding_prints_the_same_text(checkpoint, library, capsys):
    _, _, ref = library
    assert qkv(capsys, "generate", checkpoint, "--prompt", PROMPT, "-n", 12, "--compile") == (0, ref.text + "\n", "")


def test_stream_prints_the_same_text(checkpoint, library, capsys):
    assert qkv(capsys, "generate", checkpoint, "--prompt", PROMPT, "-n", 12, "--stream")[1] == library[2].text + "\n"


def test_prompt_file(checkpoint, library, capsys, tmp_path):
    (tmp_path / "prompt.txt").write_text(PROMPT, encoding="utf-8")
    code, out, _ = qkv(capsys, "generate", checkpoint, "--prompt-file", tmp_path / "prompt.txt", "-n", 12)
    assert (code, out) == (0, library[2].text + "\n")


def test_json(checkpoint, library, capsys):
    _, _, ref = library
    code, out, _ = qkv(capsys, "generate", checkpoint, "--prompt", PROMPT, "-n", 12, "--json", "--logprobs", 2)
    data = json.loads(out)
    assert code == 0
    assert (data["text"], data["token_ids"], data["finish_reason"]) == (ref.text, ref.token_ids, "length")
    assert data["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": 12}
    timings = data["timings"]
    assert timings["prompt_tokens_per_second"] > 0 and timings["decode_tokens_per_second"] > 0
    assert len(data["logprobs"]) == 12 and all(len(r["top"]) == 2 for r in data["logprobs"])


def test_stop_string(checkpoint, library, capsys):
    model, tok, ref = library
    ids, text = ref.token_ids, ref.text
    bound = len(tok.decode(ids[:2]))
    stop = text[bound - 1 : bound + 1]  # straddles the second token boundary
    at = text.index(stop)
    code, out, _ = qkv(capsys, "generate", checkpoint, "--prompt", PROMPT, "-n", 12, "--stop", stop, "--json")
    data = json.loads(out)
    assert (code, data["text"], data["finish_reason"], data["stopped_by"]) == (0, text[:at], "stop", stop)
    assert data["text"] == complete(model, tok, PROMPT, max_new_tokens=12, stop=[stop]).text


@pytest.mark.parametrize(
    "extra", [[], ["--stop", "o"], ["--temperature", 0.8, "--seed", 3], ["--repetition-penalty", 1.5]]
)
def test_beam_search_prints_what_complete_returns(checkpoint, library, capsys, extra):
    """Every decoding flag reaches beam search: stop strings, sampling (seeded), penalties."""
    model, tok, _ = library
    options = {
        "--stop": "stop",
        "--temperature": "temperature",
        "--seed": "seed",
        "--repetition-penalty": "repetition_penalty",
    }
    kwargs = {options[k]: v for k, v in zip(extra[::2], extra[1::2])}
    if "stop" in kwargs:
        kwargs["stop"] = [kwargs["stop"]]
    ref = complete(model, tok, PROMPT, max_new_tokens=12, num_beams=3, **kwargs)
    code, out, _ = qkv(capsys, "generate", checkpoint, "--prompt", PROMPT, "-n", 12, "--num-beams", 3, *extra, "--json")
    data = json.loads(out)
    assert code == 0 and (data["text"], data["token_ids"], data["finish_reason"]) == (
        ref.text, ref.token_ids, ref.finish_reason
    )  # fmt: skip
    if "stop" in kwargs:
        assert ref.finish_reason == "stop" and "o" not in ref.text


BAD = {
    "unknown flag": (["--bogus"], "--bogus"),
    "temperature < 0": (["--temperature", "-0.5"], "--temperature"),
    "top_p = 0": (["--top-p", "0"], "--top-p"),
    "top_p > 1": (["--top-p", "1.5"], "--top-p"),
    "top_k < 0": (["--top-k", "-1"], "--top-k"),
    "max_new_tokens < 1": (["--max-new-tokens", "0"], "--max-new-tokens"),
    "num_beams < 1": (["--num-beams", "0"], "--num-beams"),
    "prompt past the context": (["--prompt", "the quick brown fox " * 40], "--prompt"),
    "empty prompt, no BOS": (["--prompt", ""], "--prompt"),
    "missing prompt file": (["--prompt-file", "no/such/prompt.txt"], "--prompt-file"),
    "beams cannot stream": (["--num-beams", "2", "--stream"], "--stream"),
    "beams report no logprobs": (["--num-beams", "2", "--logprobs", "2"], "logprobs"),
    "beams are not compiled": (["--num-beams", "2", "--compile"], "--compile"),
    "length penalty without beams": (["--length-penalty", "2"], "length_penalty only apply to beam search"),
    "repetition penalty 0": (["--repetition-penalty", "0"], "--repetition-penalty"),
    "prefill chunk 0": (["--prefill-chunk", "0"], "--prefill-chunk"),
    "unknown rope scaling": (["--rope-scaling", "ntk:2"], "--rope-scaling"),
    "rope scaling factor < 1": (["--rope-scaling", "linear:0.5"], "--rope-scaling"),
    "rope scaling on a model without RoPE": (["--rope-scaling", "yarn:2"], "not RoPE"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_a_one_line_error(checkpoint, capsys, case):
    extra, flag = BAD[case]
    prompt = [] if any(a.startswith("--prompt") for a in extra) else ["--prompt", PROMPT]
    code, out, err = qkv(capsys, "generate", checkpoint, *prompt, *extra)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and out == ""
    assert len(errors) == 1 and flag in errors[0], err
    assert "Traceback" not in err


def test_exit_code_of_the_process(checkpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "qkv.cli.main", "generate", str(checkpoint), "--prompt", "hi", "--top-k", "-3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == "qkv generate: error: argument --top-k: -3 must be >= 0"


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory):
    """A tiny random T5 saved by transformers, with a trained tokenizer beside it."""
    transformers = pytest.importorskip("transformers")
    from qkv.tokenizer import train_tokenizer

    tok = train_tokenizer(kind="bpe", texts=CORPUS, vocab_size=300, show_progress=False)
    config = transformers.T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   decoder_start_token_id=1, eos_token_id=tok.eos_token_id, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("t5") / "t5"
    hf.save_pretrained(path)
    tok.save(path)
    return path, hf, tok


@pytest.mark.parametrize("beams", [1, 3])
def test_seq2seq_source_text_to_target_text(t5_checkpoint, capsys, beams):
    """For an encoder-decoder the prompt is the source; the printed text is HF generate's target."""
    path, hf, tok = t5_checkpoint
    ids = torch.tensor([tok.encode(PROMPT)])
    eos = tok.eos_token_id  # the tokenizer's EOS, which the text layer stops at
    ref = hf.generate(ids, max_new_tokens=8, num_beams=beams, do_sample=False, eos_token_id=eos, pad_token_id=1)[0]
    new = ref[1:].tolist()  # after the decoder start token
    new = new[: new.index(eos)] if eos in new else new
    assert len(new) >= 2  # a real continuation, not an immediate EOS
    code, out, _ = qkv(capsys, "generate", path, "--prompt", PROMPT, "-n", 8, "--num-beams", beams, "--json")
    data = json.loads(out)
    assert code == 0 and data["token_ids"] == new and data["text"] == tok.decode(new, skip_special_tokens=True)
    if beams == 1:
        streamed = qkv(capsys, "generate", path, "--prompt", PROMPT, "-n", 8, "--stream")[1]
        assert streamed == data["text"] + "\n"


def test_seq2seq_text_layer_sampling_stop_strings_and_logprobs(t5_checkpoint):
    """The text layer on an encoder-decoder: log-probs equal the model's own under teacher forcing,
    sampling is seeded, and a stop string cuts the text."""
    import qkv

    path, _, tok = t5_checkpoint
    model = qkv.load(path)
    done = complete(model, tok, PROMPT, max_new_tokens=8, logprobs=True, eos_token_id=[])
    source = torch.tensor([tok.encode(PROMPT)])
    target = torch.tensor([[model.config.decoder_start_token_id, *done.token_ids[:-1]]])
    with torch.no_grad():
        logp = model(source, decoder_input_ids=target).logits[0].log_softmax(-1)
    expected = [float(logp[i, t]) for i, t in enumerate(done.token_ids)]
    assert [r["logprob"] for r in done.logprobs] == pytest.approx(expected, abs=1e-5)
    sampled = [complete(model, tok, PROMPT, max_new_tokens=8, temperature=1.5, seed=s).token_ids for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    stop = done.text[2:4]
    cut = complete(model, tok, PROMPT, max_new_tokens=8, eos_token_id=[], stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == done.text[: done.text.index(stop)]


@pytest.fixture(scope="module")
def rope_checkpoint(tmp_path_factory):
    """A tiny random LLaMA (RoPE) trained on 32 positions, with the BPE of `checkpoint`."""
    from qkv.checkpoints.native import save_native
    from tiny_models import tiny_model

    path = save_tiny_checkpoint(tmp_path_factory.mktemp("rope") / "gpt2", CORPUS, 64)
    tok = load(path).tokenizer
    model = tiny_model("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=32)
    model.tokenizer = tok
    save_native(model, path.parent / "llama")
    return path.parent / "llama"


def test_rope_scaling_runs_past_the_trained_context(rope_checkpoint, capsys):
    from qkv.generation import scale_rope

    prompt = "The quick brown fox jumps over the lazy dog. " * 3  # 36 tokens, past the 32 trained
    code, _, err = qkv(capsys, "generate", rope_checkpoint, "--prompt", prompt, "-n", 8)
    assert code == 2 and "leaves no room in the model's context of 32" in err
    model = scale_rope(load(rope_checkpoint), "yarn:3")
    ref = complete(model, model.tokenizer, prompt, max_new_tokens=8)
    out = qkv(capsys, "generate", rope_checkpoint, "--prompt", prompt, "-n", 8, "--rope-scaling", "yarn:3", "--json")
    assert out[0] == 0 and json.loads(out[1])["token_ids"] == ref.token_ids
    code, _, err = qkv(capsys, "generate", rope_checkpoint, "--prompt", prompt * 3, "-n", 8, "--rope-scaling", "yarn:2")
    assert code == 2 and "context of 64 (32 trained, x2.0 by yarn RoPE scaling)" in err
