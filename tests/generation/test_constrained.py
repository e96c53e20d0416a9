"""Constrained decoding: `json_schema=` makes every row a JSON document that validates, on every
decoding path that takes it, and refuses what it cannot do before a token is generated.

The grammar engine (llguidance) reads qkv's vocabulary as bytes (`token_bytes`); those bytes are
checked against llguidance's own reading of the same tokenizer.json and against encoding text.
"""

from __future__ import annotations

import json

import pytest
import torch

from qkv.errors import GenerationOptionError
from qkv.generation import GenerationConfig, generate
from qkv.generation.constrained import (
    JSON_OBJECT,
    JsonSchemaProcessor,
    check_json_schema,
    grammar_tokenizer,
    response_format_schema,
    token_bytes,
    vocabulary_kind,
)
from qkv.generation.text import complete, stream_completion
from qkv.tokenizer import Tokenizer, train_tokenizer
from tiny_models import left_pad, tiny_model
from tiny_tokenizers import sentencepiece_engine

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

CORPUS = ['{"name": "Ann", "age": 31, "tags": ["a", "b"], "ok": true}', "Hello world, 123 ünïcödé 👍 text."] * 20
# Bounded in every direction, so that even a random model's row completes well within its budget.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
TEXTS = ["Hello world", ' {"a": [1, 2.5e3, null]}', "ünïcödé 👍 \t\n  x", "<|endoftext|> is text here"]


def sentencepiece_tokenizer(decoder: str) -> Tokenizer:
    """A small LLaMA-style SentencePiece BPE (tests/tiny_tokenizers.py); decoder: "replace" (llama.cpp's,
    as qkv's GGUF loader builds it) or "metaspace" (older HF tokenizer.json files)."""
    engine = sentencepiece_engine(CORPUS, vocab_size=420, limit_alphabet=40, decoder=decoder)
    return Tokenizer(engine, special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


@pytest.fixture(scope="module")
def byte_level():
    return train_tokenizer(kind="bpe", texts=CORPUS, vocab_size=320, show_progress=False)


@pytest.fixture(scope="module")
def model(byte_level):
    model = tiny_model("tiny-gpt2", vocab_size=byte_level.vocab_size, max_seq_len=128, eos_token_id=0)
    model.tokenizer = byte_level
    return model


@pytest.fixture(scope="module")
def prompt(byte_level):
    return torch.tensor([byte_level.encode("Describe a person as JSON:")])


def rows_of(out: torch.Tensor, prompt_len: int, eos: int) -> list[list[int]]:
    """Each row's generated tokens, up to (not including) its EOS; asserts the row has one."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        assert eos in row, f"the grammar did not end the row: {row}"
        rows.append(row[: row.index(eos)])
    return rows


def assert_valid(tokenizer: Tokenizer, tokens: list[int], schema: dict) -> dict:
    document = json.loads(tokenizer.decode(tokens))
    jsonschema.validate(document, schema)
    return document


# -- the vocabulary as bytes --------------------------------------------------------------------
def encoded_bytes(tokenizer: Tokenizer, text: str) -> bytes:
    table = token_bytes(tokenizer)
    return b"".join(table[i] for i in tokenizer.encode(text, add_special_tokens=False, allowed_special=()))


def test_byte_level_bytes_spell_the_encoded_text(byte_level):
    assert vocabulary_kind(byte_level) == "byte_level"
    for text in TEXTS:
        assert encoded_bytes(byte_level, text) == text.encode("utf-8")


@pytest.mark.parametrize("decoder", ["replace", "metaspace"])
def test_sentencepiece_bytes_spell_the_encoded_text(decoder):
    tok = sentencepiece_tokenizer(decoder)
    assert vocabulary_kind(tok) == "sentencepiece"
    for text in TEXTS:  # the dummy prefix is a real ▁ token: a leading space
        assert encoded_bytes(tok, text) == b" " + text.encode("utf-8")
    assert b"\x8d" in token_bytes(tok)  # the byte-fallback tokens are their byte (<0x8D>: no text spells it)


def assert_bytes_match_llguidance(tokenizer: Tokenizer) -> None:
    """Our bytes for every id equal llguidance's own reading of the tokenizer.json; special tokens
    carry its marker byte, and it sees the same ones as special."""
    reference = llguidance.LLTokenizer(tokenizer.engine.to_str(), n_vocab=tokenizer.vocab_size)
    ours = grammar_tokenizer(tokenizer, [tokenizer.eos_token_id], tokenizer.vocab_size)
    table = token_bytes(tokenizer)
    for i in range(tokenizer.vocab_size):
        assert ours.decode_bytes([i]) == reference.decode_bytes([i]), i
        assert ours.is_special_token(i) == reference.is_special_token(i), i
        assert table[i].startswith(b"\xff") == reference.is_special_token(i), i


def test_byte_level_bytes_match_llguidance(byte_level):
    assert_bytes_match_llguidance(byte_level)


def test_sentencepiece_bytes_match_llguidance():
    # Only llama.cpp's decoder: llguidance's reader leaves the ▁ of a Metaspace decoder as it is
    # (U+2581, not a space), so there the encoded-text test above is the reference.
    assert_bytes_match_llguidance(sentencepiece_tokenizer("replace"))


def test_wordpiece_is_refused():
    tok = train_tokenizer(kind="wordpiece", texts=CORPUS, vocab_size=200, show_progress=False)
    with pytest.raises(GenerationOptionError, match="byte-level BPE or SentencePiece"):
        JsonSchemaProcessor(PERSON, tok, eos=[0])


# -- the output always validates ----------------------------------------------------------------
DECODING = {
    "greedy": {},
    "sampled": {"temperature": 1.0, "seed": 1},
    "top_p_top_k": {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 2},
    "min_p_typical_p": {"temperature": 1.0, "min_p": 0.05, "typical_p": 0.95, "seed": 4},
    "penalties": {"temperature": 1.2, "repetition_penalty": 1.3, "presence_penalty": 0.5, "seed": 3},
}


@pytest.mark.parametrize("options", DECODING.values(), ids=DECODING.keys())
def test_rows_validate(model, prompt, options):
    out = generate(model, prompt, 60, json_schema=PERSON, num_return_sequences=3, **options)
    for tokens in rows_of(out, prompt.shape[1], eos=0):
        assert_valid(model.tokenizer, tokens, PERSON)


def test_each_row_of_a_left_padded_batch_keeps_its_own_state(model, byte_level):
    prompts = [torch.tensor(byte_level.encode(t)) for t in ("A person:", "Here is a longer prompt, as JSON:")]
    ids, mask = left_pad(prompts)
    out = generate(model, ids, 60, attention_mask=mask, json_schema=PERSON, temperature=1.0, seed=0)
    for tokens in rows_of(out, ids.shape[1], eos=0):
        assert_valid(byte_level, tokens, PERSON)
    greedy = generate(model, ids, 60, attention_mask=mask, json_schema=PERSON)
    for i, tokens in enumerate(rows_of(greedy, ids.shape[1], eos=0)):
        alone = generate(model, prompts[i][None], 60, json_schema=PERSON)
        assert tokens == rows_of(alone, len(prompts[i]), eos=0)[0]  # greedy: the same as alone


def test_an_encoder_decoder_follows_the_schema_after_its_start_token(byte_level):
    from qkv import ModelConfig
    from qkv.models import EncoderDecoder

    torch.manual_seed(0)
    t5 = EncoderDecoder(ModelConfig.from_name("tiny-t5", vocab_size=byte_level.vocab_size)).eval()
    t5.tokenizer = byte_level
    source = torch.tensor([byte_level.encode("A person:")] * 2)
    out = generate(t5, source, 60, json_schema=PERSON, eos_token_id=0, temperature=1.0, seed=0)
    for tokens in rows_of(out, 1, eos=0):  # the decoder continues its start token
        assert_valid(byte_level, tokens, PERSON)


def test_the_grammar_changes_the_output(model, prompt):
    free = generate(model, prompt, 40)[0, prompt.shape[1] :].tolist()
    with pytest.raises(json.JSONDecodeError):
        json.loads(model.tokenizer.decode(free))


def test_any_object(model, prompt):
    """JSON_OBJECT allows any object, and only an object: the document opens with '{'. (A random
    model rarely closes an unbounded object; the SmolLM2 test below shows one completed.)"""
    out = generate(model, prompt, 8, json_schema=JSON_OBJECT, temperature=1.0, seed=0, num_return_sequences=3)
    for row in out[:, prompt.shape[1] :].tolist():
        assert model.tokenizer.decode(row).startswith("{")


def test_the_grammar_ends_generation_before_the_budget(model, prompt):
    schema = {"enum": ["yes", "no"]}
    result = complete(model, model.tokenizer, prompt[0].tolist(), max_new_tokens=50, json_schema=schema)
    assert result.finish_reason == "stop" and json.loads(result.text) in ("yes", "no")
    assert result.completion_tokens < 50


def test_running_out_of_tokens_reports_length(model, prompt):
    result = complete(model, model.tokenizer, prompt[0].tolist(), max_new_tokens=3, json_schema=PERSON)
    assert result.finish_reason == "length" and len(result.token_ids) == 3
    assert result.text.startswith('{"')  # the start of a document, not a whole one
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


def test_streamed_text_is_the_document(model, prompt):
    items = list(stream_completion(model, model.tokenizer, prompt[0].tolist(), max_new_tokens=60, json_schema=PERSON))
    *pieces, result = items
    assert "".join(pieces) == result.text
    assert_valid(model.tokenizer, result.token_ids, PERSON)


def test_a_stop_string_ends_one_row_mid_document(model, prompt):
    """A row ended by a stop string receives padding; its matcher is retired, the other rows go on."""
    out = generate(model, prompt, 60, json_schema=PERSON, stop=['"age"'], temperature=1.0, seed=0,
                   num_return_sequences=2)  # fmt: skip
    for row in out[:, prompt.shape[1] :].tolist():
        assert '"age"' in model.tokenizer.decode(row, skip_special_tokens=True)


def test_custom_processors_see_only_allowed_tokens(model, prompt):
    seen = []

    def spy(logits, input_ids):
        seen.append(torch.isfinite(logits).sum(-1))
        return logits

    out = generate(model, prompt, 60, json_schema=PERSON, processors=[spy])
    assert_valid(model.tokenizer, rows_of(out, prompt.shape[1], eos=0)[0], PERSON)
    assert seen[0].tolist() == [1]  # '{' is the only way to start the document
    assert all(int(n.max()) < model.config.vocab_size for n in seen)


def test_the_compiled_step_applies_the_grammar(model, prompt):
    eager = generate(model, prompt, 60, json_schema=PERSON, compile=False)
    compiled = generate(model, prompt, 60, json_schema=PERSON, compile=True)
    assert torch.equal(eager, compiled)
    assert_valid(model.tokenizer, rows_of(compiled, prompt.shape[1], eos=0)[0], PERSON)


# -- what is refused, and when -----------------------------------------------------------------
BAD_SCHEMAS = {
    "unknown type": ({"type": "foo"}, "Invalid type: foo"),
    "malformed keyword": ({"type": "object", "properties": 5}, "properties must be an object"),
    "bad minLength": ({"type": "string", "minLength": "x"}, "minLength"),
    "bad regex": ({"type": "string", "pattern": "("}, "unclosed group"),
    "dangling ref": ({"$ref": "#/nope"}, "/nope"),
    "unsupported keyword": ({"type": "array", "uniqueItems": True}, "unsupported: Unimplemented keys.*uniqueItems"),
    "not JSON": ("{type: object", "not valid JSON text"),
    "not an object": ([1, 2], "must be a JSON Schema object"),
    "a bool": (True, "ambiguous"),
}


@pytest.mark.parametrize(("schema", "message"), BAD_SCHEMAS.values(), ids=BAD_SCHEMAS.keys())
def test_an_invalid_schema_is_refused_when_the_options_are_built(schema, message):
    with pytest.raises(GenerationOptionError, match=message):
        GenerationConfig(json_schema=schema)


def test_an_invalid_schema_is_refused_before_the_model_runs(model, prompt, monkeypatch):
    monkeypatch.setattr(model, "decode", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(GenerationOptionError, match="Invalid type"):
        generate(model, prompt, 10, json_schema={"type": "foo"})
    with pytest.raises(GenerationOptionError, match="no EOS|none is known"):
        generate(model, prompt, 10, json_schema=PERSON, eos_token_id=())
    monkeypatch.setattr(model, "tokenizer", None)
    with pytest.raises(GenerationOptionError, match="qkv Tokenizer"):
        generate(model, prompt, 10, json_schema=PERSON)


def test_schema_text_is_parsed_and_property_order_kept():
    config = GenerationConfig(json_schema=json.dumps(PERSON))
    assert config.json_schema == PERSON and list(config.json_schema["properties"]) == ["name", "age", "pet"]
    assert check_json_schema(PERSON) is not PERSON  # a copy: later changes to the caller's dict do not leak in


@pytest.mark.parametrize("mode", [{"num_beams": 2}, {"num_beams": 2, "temperature": 1.0}])
def test_beam_search_refuses_json_schema(model, prompt, mode):
    with pytest.raises(GenerationOptionError, match="json_schema cannot be used with beam search"):
        generate(model, prompt, 10, json_schema=PERSON, **mode)
    with pytest.raises(GenerationOptionError, match="json_schema cannot be used with beam search"):
        complete(model, model.tokenizer, prompt[0].tolist(), max_new_tokens=10, json_schema=PERSON, **mode)


def test_speculative_decoding_refuses_json_schema(model, prompt):
    from qkv.generation import speculative_generate

    with pytest.raises(GenerationOptionError, match="json_schema cannot be used with speculative decoding"):
        speculative_generate(model, model, prompt, 10, json_schema=PERSON)


def test_missing_llguidance_says_how_to_install(monkeypatch):
    import sys

    from qkv.generation import constrained

    monkeypatch.setitem(sys.modules, "llguidance", None)
    constrained._grammar.cache_clear()
    try:
        with pytest.raises(GenerationOptionError, match="pip install llguidance"):
            GenerationConfig(json_schema={"type": "object", "title": "never compiled before"})
    finally:
        constrained._grammar.cache_clear()


def test_response_format():
    assert response_format_schema(None) is None
    assert response_format_schema({"type": "text"}) is None
    assert response_format_schema({"type": "json_object"}) == JSON_OBJECT
    assert response_format_schema({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}) == PERSON
    with pytest.raises(GenerationOptionError, match="json_schema"):
        response_format_schema({"type": "json_schema", "json_schema": {"name": "p"}})
    with pytest.raises(GenerationOptionError, match="'xml'"):
        response_format_schema({"type": "xml"})


# -- the command line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny_checkpoint import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("constrained") / "tiny", CORPUS, 128)


@pytest.mark.parametrize("given", ["inline", "file"])
def test_cli_json_schema(checkpoint, capsys, tmp_path, given):
    from cli_run import qkv

    schema = json.dumps(PERSON)
    if given == "file":
        (tmp_path / "person.json").write_text(schema, encoding="utf-8")
        schema = tmp_path / "person.json"
    code, out, err = qkv(capsys, "generate", checkpoint, "--prompt", "A person:", "-n", 60, "--json-schema", schema,
                         "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "stop"
    jsonschema.validate(json.loads(result["text"]), PERSON)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--json-schema", '{"type": "foo"}'], "Invalid type: foo"),
        (["--json-schema", "missing.json"], "missing.json"),
        (["--json-schema", json.dumps(PERSON), "--num-beams", "2"], "json_schema cannot be used with beam search"),
    ],
    ids=["invalid", "no such file", "beams"],
)
def test_cli_refuses(checkpoint, capsys, extra, message):
    from cli_run import qkv

    code, out, err = qkv(capsys, "generate", checkpoint, "--prompt", "A person:", "-n", 8, *extra)
    assert code == 2 and out == "" and message in err


# -- real weights: SmolLM2-135M-Instruct -------------------------------------------------------
PERSON_FROM_ISSUE = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK = "Give me a JSON object describing a person named Alice who is 30 years old."


@pytest.fixture(scope="module")
def smollm2():
    import qkv

    return qkv.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def chat_ids(smollm2):
    return smollm2.tokenizer.apply_chat_template([{"role": "user", "content": ASK}], tokenize=True)


@pytest.mark.real
def test_smollm2_bytes_match_llguidance(smollm2):
    assert vocabulary_kind(smollm2.tokenizer) == "byte_level"
    assert_bytes_match_llguidance(smollm2.tokenizer)
    for text in TEXTS:
        assert encoded_bytes(smollm2.tokenizer, text) == text.encode("utf-8")


@pytest.mark.real
@pytest.mark.parametrize("compile", [None, False], ids=["default-compiled", "eager"])
def test_smollm2_follows_the_schema(smollm2, chat_ids, compile):
    result = complete(smollm2, smollm2.tokenizer, chat_ids, max_new_tokens=64, json_schema=PERSON_FROM_ISSUE,
                      compile=compile)  # fmt: skip
    assert result.finish_reason == "stop" and result.completion_tokens < 64  # the grammar ended it
    assert assert_valid(smollm2.tokenizer, result.token_ids, PERSON_FROM_ISSUE) == {"name": "Alice", "age": 30}


@pytest.mark.real
def test_smollm2_without_the_schema_writes_something_else(smollm2, chat_ids):
    """The same prompt, unconstrained: pretty-printed JSON with extra keys, cut off by the budget."""
    result = complete(smollm2, smollm2.tokenizer, chat_ids, max_new_tokens=64)
    try:
        jsonschema.validate(json.loads(result.text), PERSON_FROM_ISSUE)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return
    pytest.fail(f"the unconstrained text already validates, so the schema test proves nothing: {result.text!r}")


@pytest.mark.real
def test_smollm2_sampled_batch_validates(smollm2, chat_ids):
    out = generate(smollm2, torch.tensor([chat_ids]), 64, json_schema=PERSON_FROM_ISSUE, temperature=1.0,
                   top_p=0.95, top_k=50, seed=0, num_return_sequences=4, compile=False)  # fmt: skip
    for tokens in rows_of(out, len(chat_ids), eos=smollm2.tokenizer.eos_token_id):
        assert_valid(smollm2.tokenizer, tokens, PERSON_FROM_ISSUE)


@pytest.mark.real
def test_smollm2_any_object(smollm2):
    ask = 'Return a JSON object with one key, "capital", naming the capital of France.'
    ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": ask}], tokenize=True)
    result = complete(smollm2, smollm2.tokenizer, ids, max_new_tokens=64, json_schema=JSON_OBJECT)
    assert result.finish_reason == "stop" and json.loads(result.text) == {"capital": "Paris"}
