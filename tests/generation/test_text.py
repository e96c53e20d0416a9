"""Text in, text out: `TextStream` never shows a broken character, grapheme or stop string, and
`complete`/`stream` report what the token loop did (finish reason, log-probs, timings)."""

from __future__ import annotations

import json
import math

import pytest
import regex
import torch

from qkv import DecoderLM, ModelConfig
from qkv.generation.text import TextStream, complete, stream, stream_completion
from qkv.tokenizer import train_tokenizer

# Emoji ZWJ sequences, a flag with a variation selector, CJK, combining marks, regional
# indicators and ASCII: every way a token boundary can fall inside a character or a grapheme.
SAMPLES = [
    "Family: 👩‍👩‍👧 and pride 🏳️‍🌈 flags.",
    "東京は日本の首都です。漢字とかな。",
    "Cafe\u0301 au lait, re\u0301sume\u0301, nai\u0308ve.",
    "The quick brown fox jumps over the lazy dog 123!",
]
UNSEEN = ["👨‍👩‍👦 🇺🇸🇬🇧 unseen 中文 ñ e\u0301\u0301x", "ab👩‍👧cd 🏳️‍🌈🏳️‍🌈 x"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(kind="bpe", texts=SAMPLES * 20, vocab_size=320, show_progress=False)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = ModelConfig.from_name("tiny-gpt2", vocab_size=tok.vocab_size, max_seq_len=64)
    yield DecoderLM(cfg).eval()
    torch.set_num_threads(threads)


def byte_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte (GPT-2's byte alphabet): every multi-byte character is split."""
    table = bytes_to_unicode()
    return [tok.token_to_id(table[b]) for b in text.encode("utf-8")]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2, encoder.py): printable bytes map to
    themselves, the others to U+0100 upwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def grapheme_boundaries(text: str) -> set[int]:
    return {m.start() for m in regex.finditer(r"\X", text)} | {len(text)}


def feed(tok, ids, stop=()):
    """Push ids one by one; return the pieces, the flushed rest and the stream."""
    ts = TextStream(tok, stop)
    pieces = []
    for i in ids:
        pieces.append(ts.push(i))
        if ts.stopped:
            break
    return pieces, ts.flush(), ts


@pytest.fixture(params=["encode", "bytes"])
def id_sequences(request, tok):
    """Each sample as the tokenizer encodes it, or one token per byte."""
    texts = SAMPLES + UNSEEN
    if request.param == "encode":
        return [(t, tok.encode(t)) for t in texts]
    return [(t, byte_ids(tok, t)) for t in texts]


def test_samples_split_characters(tok, id_sequences):
    # The fixture is only useful if tokens cut characters in two.
    assert any("\ufffd" in tok.decode([i]) for _, ids in id_sequences for i in ids)
    for text, ids in id_sequences:
        assert tok.decode(ids) == text


def test_pieces_are_whole_characters_and_graphemes(tok, id_sequences):
    for text, ids in id_sequences:
        pieces, rest, _ = feed(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in [*pieces, rest]), text
        bounds = grapheme_boundaries(text)
        emitted = 0
        for piece in pieces:
            emitted += len(piece)
            assert emitted in bounds, (text, text[:emitted])


def test_random_ids_concatenate_to_decode(tok):
    # Random ids make invalid UTF-8; whatever is shown must still add up to the decoded text.
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(1, tok.vocab_size, (30,), generator=g).tolist()
        pieces, rest, _ = feed(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids)


def spanning_stops(text: str, ids: list[int], tok) -> list[str]:
    """Every substring of 2-4 characters that starts in one token and ends in a later one."""
    ends = {len(tok.decode(ids[:k])) for k in range(1, len(ids)) if "\ufffd" not in tok.decode(ids[:k])}
    stops = set()
    for i in range(len(text)):
        for j in range(i + 2, min(i + 4, len(text)) + 1):
            if any(i < e < j for e in ends):
                stops.add(text[i:j])
    return sorted(stops)


def test_stop_strings_across_tokens(tok, id_sequences):
    checked = 0
    for text, ids in id_sequences:
        for stop in spanning_stops(text, ids, tok):
            at = text.index(stop)
            ts = TextStream(tok, [stop])
            shown = ""
            for i in ids:
                shown += ts.push(i)
                # Nothing past the stop's start is ever shown, not even a prefix of it.
                assert text[:at].startswith(shown), (stop, shown)
                if ts.stopped:
                    break
            shown += ts.flush()
            assert ts.stopped and ts.stop_hit == stop
            assert shown == ts.text == text[:at], stop
            checked += 1
    assert checked > 50


def test_stop_string_that_diverges_is_shown(tok):
    text = "The quick brown fox"
    pieces, rest, ts = feed(tok, tok.encode(text), stop=["quiet", "fox!"])
    assert not ts.stopped
    assert "".join(pieces) + rest == text


def test_empty_stop_string_is_refused(tok):
    with pytest.raises(ValueError, match="non-empty"):
        TextStream(tok, [""])


# ----- complete / stream with a tiny random model ----------------------------------------------

PROMPT = "The quick brown"


@pytest.fixture(scope="module")
def greedy(model, tok):
    """The free-running greedy continuation (no EOS, no stop), 24 tokens."""
    out = complete(model, tok, PROMPT, max_new_tokens=24, eos_token_id=[])
    assert tok.eos_token_id not in out.token_ids  # so the default EOS does not interfere below
    return out


def test_finish_length(model, tok, greedy):
    out = complete(model, tok, PROMPT, max_new_tokens=24)
    assert out.finish_reason == "length" and out.stopped_by is None
    assert out.token_ids == greedy.token_ids
    assert out.text == tok.decode(out.token_ids)
    assert out.prompt_tokens == len(tok.encode(PROMPT))


def test_finish_stop_on_eos(model, tok, greedy):
    ids = greedy.token_ids
    j = next(j for j in range(2, len(ids)) if ids[j] not in ids[:j])
    out = complete(model, tok, PROMPT, max_new_tokens=24, eos_token_id=ids[j])
    assert out.finish_reason == "stop" and out.stopped_by == tok.decode([ids[j]])
    assert out.token_ids == ids[:j]  # EOS itself is not part of the completion
    assert out.text == tok.decode(ids[:j])


def test_finish_stop_on_stop_string(model, tok, greedy):
    ids, text = greedy.token_ids, greedy.text
    # A boundary between two tokens with clean text on both sides; the stop straddles it.
    bound = next(
        n for k in range(2, len(ids)) if (n := len(tok.decode(ids[:k]))) >= 1 and "\ufffd" not in text[: n + 1]
    )
    stop = text[bound - 1 : bound + 1]
    at = text.index(stop)
    out = complete(model, tok, PROMPT, max_new_tokens=24, stop=stop)
    assert out.finish_reason == "stop" and out.stopped_by == stop
    assert out.text == text[:at]
    assert "".join(stream(model, tok, PROMPT, max_new_tokens=24, stop=[stop])) == text[:at]


def test_finish_context(model, tok):
    limit = model.config.context_limit
    filler = (tok.encode(PROMPT) * limit)[:limit]
    out = complete(model, tok, filler[:-5], max_new_tokens=20, eos_token_id=[])
    assert out.finish_reason == "context" and len(out.token_ids) == 5
    one = complete(model, tok, filler[:-1], max_new_tokens=20, eos_token_id=[])  # room for one token
    assert one.finish_reason == "context" and len(one.token_ids) == 1
    json.dumps(one.to_dict(), allow_nan=False)  # no inf tokens/s when nothing was decoded after the prefill
    for prompt in (filler, [*filler, filler[0]]):  # a prompt that fills the context leaves no room
        with pytest.raises(ValueError, match="leaves no room in the model's context"):
            complete(model, tok, prompt, max_new_tokens=1)


def test_logprobs_equal_full_forward(model, tok):
    prompt = tok.encode(PROMPT)
    out = complete(model, tok, prompt, max_new_tokens=10, logprobs=True, top_logprobs=5, eos_token_id=[])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0]
    ref = logits[len(prompt) - 1 : -1].log_softmax(-1)  # the distribution each new token was drawn from
    assert len(out.logprobs) == len(out.token_ids) == 10
    for row, record, token in zip(ref, out.logprobs, out.token_ids):
        assert record["id"] == token and record["token"] == tok.decode([token])
        assert math.isclose(record["logprob"], row[token].item(), abs_tol=1e-4)
        top = record["top"]
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True) and len(top) == 5
        assert top[0]["id"] == token  # greedy: the chosen token is the most likely
        ref_values, ref_ids = row.topk(5)
        assert [t["id"] for t in top] == ref_ids.tolist()
        assert torch.allclose(torch.tensor(values), ref_values, atol=1e-4)


def test_stream_concatenates_to_complete(model, tok):
    for options in (dict(), dict(temperature=0.9, top_k=50, seed=3), dict(stop=["e"])):
        pieces = list(stream(model, tok, PROMPT, max_new_tokens=20, **options))
        assert "".join(pieces) == complete(model, tok, PROMPT, max_new_tokens=20, **options).text
        assert all(pieces)  # no empty pieces


def test_closing_the_stream_early(model, tok):
    for gen in (stream(model, tok, PROMPT, max_new_tokens=40), stream_completion(model, tok, PROMPT)):
        first = next(gen)
        assert isinstance(first, str) and first
        gen.close()
        with pytest.raises(StopIteration):
            next(gen)
    assert complete(model, tok, PROMPT, max_new_tokens=3).completion_tokens == 3  # nothing left behind


def test_timings_are_positive(model, tok):
    out = complete(model, tok, PROMPT, max_new_tokens=8, eos_token_id=[])
    assert out.prefill_seconds > 0 and out.decode_seconds > 0
    assert out.prompt_tokens_per_second > 0 and out.decode_tokens_per_second > 0
    timings = out.to_dict()["timings"]
    assert all(math.isfinite(v) and v > 0 for v in timings.values())
