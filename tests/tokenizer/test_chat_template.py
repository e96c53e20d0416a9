"""Chat templates: rendered as transformers renders them, in a sandbox that untrusted templates cannot leave."""

from __future__ import annotations

import datetime

import pytest
from transformers import PreTrainedTokenizerFast

from qkv.errors import TokenizerError
from qkv.tokenizer import Tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": 'Hi <there> & "you"'},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "日本?"},
]

# Written the way real model templates are: loop controls, raise_exception, tojson, bos/eos.
TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if loop.index0 > 10 %}{% break %}{% endif %}"
    "{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "[{{ message['role'] }}] {{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(trained_bpe, tmp_path_factory) -> Tokenizer:
    tok = Tokenizer(trained_bpe.engine, special_tokens=trained_bpe.special_tokens, chat_template=TEMPLATE)
    return tok


@pytest.fixture(scope="module")
def reference(chat_tokenizer, tmp_path_factory) -> PreTrainedTokenizerFast:
    directory = tmp_path_factory.mktemp("chat")
    chat_tokenizer.save(directory)
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, [{"name": "search", "description": "Looks <things> up", "n": 1}]])
def test_renders_as_transformers(chat_tokenizer, reference, add_generation_prompt, tools):
    expected = reference.apply_chat_template(
        CHAT, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert chat_tokenizer.apply_chat_template(CHAT, add_generation_prompt, tools=tools) == expected


def test_tokenize_recognises_special_tokens(chat_tokenizer, reference):
    ids = chat_tokenizer.apply_chat_template(CHAT, tokenize=True)
    assert ids == reference.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids.count(chat_tokenizer.eos_token_id) == 1 + 3  # bos_token is <|endoftext|> too


def test_strftime_now():
    tok = Tokenizer(Tokenizer.train(texts=["a"], vocab_size=260, show_progress=False).engine)
    year = tok.apply_chat_template([], template="{{ strftime_now('%Y') }}")
    assert year == str(datetime.date.today().year)


def test_no_template_is_an_error_unless_a_default_is_asked_for(trained_bpe):
    with pytest.raises(TokenizerError, match="has no chat template.*chatml"):
        trained_bpe.apply_chat_template(CHAT)
    text = trained_bpe.apply_chat_template(CHAT[:2], template="chatml")
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        '<|im_start|>user\nHi <there> & "you"<|im_end|>\n<|im_start|>assistant\n'
    )


def test_template_that_raises(chat_tokenizer):
    with pytest.raises(TokenizerError, match="chat template raised an error: Unknown role: tool"):
        chat_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['os'] }}",
        "{% set x = messages.append(1) %}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_template_cannot_escape_the_sandbox(chat_tokenizer, template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="tried to reach outside its sandbox: access to attribute"):
        chat_tokenizer.apply_chat_template(messages, template=template)
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for m in messages %}", "syntax error at line 1"),
        ("{{ messages[0]['content'] + 1 }}", "chat template failed: TypeError"),
        ("{{ missing.attribute }}", "chat template failed: UndefinedError"),
    ],
)
def test_broken_templates(chat_tokenizer, template, message):
    with pytest.raises(TokenizerError, match=message):
        chat_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], template=template)


def test_messages_must_be_a_list(chat_tokenizer):
    with pytest.raises(TokenizerError, match="messages must be a list"):
        chat_tokenizer.apply_chat_template("hello")
