"""`GenerationConfig`: one option list for every entry point, honoured or refused on every path."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from oracle import make_hf_model, qkv_from_hf
from qkv import DecoderLM, ModelConfig
from qkv.errors import GenerationOptionError
from qkv.generation import GenerationConfig, complete, generate, speculative_generate, stream
from qkv.generation.decode import resolve_eos
from qkv.generation.text import trim_at_eos
from qkv.models.decoder import early_exit_draft
from qkv.tokenizer import train_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog. A stitch in time saves nine."] * 30


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(kind="bpe", texts=TEXTS, vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2", vocab_size=tok.vocab_size, max_seq_len=48)).eval()
    model.tokenizer = tok
    return model


@functools.cache
def _hf_pair(name: str) -> tuple:
    hf = make_hf_model(name)
    return hf, qkv_from_hf(hf)


def _entry_points(model, tok):
    """Every public way to decode, each called with extra keyword options."""
    ids = torch.tensor([tok.encode("The quick")])
    return {
        "generate": lambda **o: generate(model, ids, 4, **o),
        "model.generate": lambda **o: model.generate(ids, 4, **o),
        "complete": lambda **o: complete(model, tok, "The quick", max_new_tokens=4, **o),
        "stream": lambda **o: list(stream(model, tok, "The quick", max_new_tokens=4, **o)),
        "speculative": lambda **o: speculative_generate(model, early_exit_draft(model, 1), ids, 4, **o),
    }


@pytest.mark.parametrize("entry", ["generate", "model.generate", "complete", "stream", "speculative"])
def test_a_misspelt_option_is_a_type_error_naming_it(model, tok, entry):
    with pytest.raises(TypeError, match="'temprature' \\(did you mean 'temperature'\\?\\)"):
        _entry_points(model, tok)[entry](temprature=0.5)


BAD = {
    "max_new_tokens": 0,
    "temperature": -0.1,
    "top_k": -1,
    "top_p": 0.0,
    "min_p": 1.5,
    "typical_p": 2.0,
    "repetition_penalty": 0.0,
    "frequency_penalty": float("nan"),
    "num_beams": 0,
    "num_return_sequences": 0,
    "top_logprobs": -1,
    "early_stopping": "sometimes",
    "stop": [""],
    "eos_token_id": [-1],
    "seed": 1.5,
}


@pytest.mark.parametrize("name", BAD)
def test_an_out_of_range_option_names_itself(name):
    with pytest.raises(GenerationOptionError, match=name):
        GenerationConfig(**{name: BAD[name]})


@pytest.mark.parametrize("option", [dict(length_penalty=2.0), dict(early_stopping=True), dict(no_repeat_ngram_size=2)])
def test_beam_options_without_beams_are_refused(option):
    with pytest.raises(GenerationOptionError, match="only apply to beam search"):
        GenerationConfig(**option)


def test_keywords_override_a_config_and_normalise():
    base = GenerationConfig(temperature=0.7, top_k=5, stop="\n")
    merged = GenerationConfig.build(base, top_k=9, max_new_tokens=None)
    assert (merged.temperature, merged.top_k, merged.stop, merged.max_new_tokens) == (0.7, 9, ("\n",), 32)
    assert GenerationConfig(eos_token_id=3).eos_token_id == (3,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.top_k = 1


def test_eos_comes_from_the_options_then_the_tokenizer_then_the_model(model, tok):
    assert resolve_eos(GenerationConfig(eos_token_id=[7, 8]), model, tok) == (7, 8)
    assert resolve_eos(GenerationConfig(), model, tok) == (tok.eos_token_id,)
    assert resolve_eos(GenerationConfig(), DecoderLM(ModelConfig.from_name("tiny-gpt2", eos_token_id=5))) == (5,)


def test_stop_strings_in_model_generate(model, tok):
    """`model.generate(ids, stop=[...])` ends a row at the token that completes the stop string."""
    ids = torch.tensor([tok.encode("The quick")])
    free = model.generate(ids, 20, eos_token_id=[])[0, ids.shape[1] :].tolist()
    text = tok.decode(free)
    stop = text[len(tok.decode(free[:3])) - 1 :][:2]  # straddles a token boundary
    cut = next(n for n in range(1, len(free) + 1) if stop in tok.decode(free[:n]))
    out = model.generate(ids, 20, eos_token_id=[], pad_token_id=0, stop=[stop])[0, ids.shape[1] :].tolist()
    assert out[:cut] == free[:cut] and set(out[cut:]) <= {0}
    assert cut < len(free)


def test_stop_strings_need_a_tokenizer():
    bare = DecoderLM(ModelConfig.from_name("tiny-gpt2")).eval()
    with pytest.raises(ValueError, match="need a tokenizer"):
        bare.generate(torch.tensor([[1, 2]]), 4, stop=["x"])


def test_unsupported_combinations_are_refused(model, tok):
    ids = torch.tensor([tok.encode("The quick")])
    with pytest.raises(GenerationOptionError, match="logprobs"):
        generate(model, ids, 4, logprobs=True)  # ids only: ask complete() for logprobs
    with pytest.raises(GenerationOptionError, match="logprobs cannot be used with beam search"):
        complete(model, tok, "The quick", num_beams=2, top_logprobs=2)
    with pytest.raises(GenerationOptionError, match="cannot stream"):
        list(stream(model, tok, "The quick", num_beams=2))
    with pytest.raises(GenerationOptionError, match="num_return_sequences"):
        complete(model, tok, "The quick", num_return_sequences=2)
    with pytest.raises(GenerationOptionError, match="temperature, seed cannot be used with speculative"):
        speculative_generate(model, early_exit_draft(model, 1), ids, 4, temperature=0.5, seed=1)


@pytest.mark.parametrize("entry", ["generate", "beam", "speculative", "complete"])
def test_one_context_rule_on_every_path(model, tok, entry):
    """A prompt that fills the context is refused everywhere; one token short leaves room for one."""
    limit = model.config.context_limit
    run = {
        "generate": lambda ids: generate(model, ids, 5, eos_token_id=[]),
        "beam": lambda ids: generate(model, ids, 5, num_beams=2, eos_token_id=[]),
        "speculative": lambda ids: speculative_generate(model, early_exit_draft(model, 1), ids, 5, eos_token_id=[])[0],
        "complete": lambda ids: torch.tensor([ids[0].tolist() + complete(model, tok, ids[0].tolist(), max_new_tokens=5,
                                                                           eos_token_id=[]).token_ids]),
    }[entry]  # fmt: skip
    full = torch.randint(3, 300, (1, limit), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"prompt of {limit} tokens leaves no room in the model's context of {limit}"):
        run(full)
    assert run(full[:, :-1]).shape == (1, limit)


def test_beam_search_with_repetition_penalty_equals_hf():
    hf, model = _hf_pair("llama-gqa-6-2")
    ids = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_beams=3, max_new_tokens=10, num_return_sequences=3, repetition_penalty=1.8, eos_token_id=2,
                  pad_token_id=2)  # fmt: skip
    ours = generate(model, ids, **kwargs)
    assert ours.tolist() == hf.generate(ids, do_sample=False, **kwargs).tolist()
    assert ours.tolist() != generate(model, ids, **{**kwargs, "repetition_penalty": None}).tolist()


def test_sampled_beams_equal_hf_beam_sampling_with_the_same_seed():
    """temperature > 0 with beams is HF's beam sampling; a seeded generator draws what HF draws
    from the global generator seeded alike."""
    hf, model = _hf_pair("gpt2")
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    kwargs = dict(num_beams=3, max_new_tokens=8, temperature=0.9, top_k=20, eos_token_id=0, pad_token_id=0)
    ours = generate(model, ids, seed=11, **kwargs)
    torch.manual_seed(11)
    assert ours.tolist() == hf.generate(ids, do_sample=True, **kwargs).tolist()
    assert torch.equal(ours, generate(model, ids, seed=11, **kwargs))
    assert not torch.equal(ours, generate(model, ids, seed=12, **kwargs))


def test_complete_with_beams_trims_at_eos_and_stop_strings(model, tok):
    prompt = tok.encode("The quick")
    ids = torch.tensor([prompt])
    free = generate(model, ids, 12, num_beams=3, eos_token_id=[])[0, len(prompt) :].tolist()
    # A token the free search emits after a few others: as EOS it ends the best hypothesis early
    # (length_penalty=0 ranks by total log-probability, which favours the short hypothesis).
    eos = next(t for t in free if t not in free[:2])
    rows = generate(model, ids, 12, num_beams=3, eos_token_id=eos, length_penalty=0.0)[0, len(prompt) :].tolist()
    assert eos in rows and rows.index(eos) >= 2
    done = complete(model, tok, prompt, max_new_tokens=12, num_beams=3, eos_token_id=eos, length_penalty=0.0)
    assert (done.token_ids, done.finish_reason) == (trim_at_eos(rows, [eos])[0], "stop")
    assert eos not in done.token_ids and done.text == tok.decode(done.token_ids)
    text = tok.decode(free)
    stop = text[4:6]
    stopped = complete(model, tok, prompt, max_new_tokens=12, num_beams=3, eos_token_id=[], stop=[stop],
                       length_penalty=0.0)  # fmt: skip
    assert stopped.finish_reason == "stop" and stopped.stopped_by == stop and stop not in stopped.text
