from __future__ import annotations

import json

import pytest

from proto.tandem.internal.v1 import worker_pb2
from router.errors import InvalidRequestError
from router.tokenizer import RouterTokenizer
from tests.router.fakes import VOCAB, tokenizer_config, tokenizer_json


def make(config: dict) -> RouterTokenizer:
    info = worker_pb2.InstanceInfo(
        tokenizer_json=tokenizer_json().encode(), tokenizer_config_json=json.dumps(config)
    )
    return RouterTokenizer.from_info(info)


def test_encode_adds_the_special_tokens_unless_told_not_to() -> None:
    tokenizer = make(tokenizer_config())
    assert tokenizer.encode("hello world") == [VOCAB["<s>"], VOCAB["hello"], VOCAB["world"]]
    assert tokenizer.encode("hello world", add_special_tokens=False) == [6, 7]
    assert tokenizer.decode([1, 6, 7]) == "hello world"


def test_the_chat_template_gets_the_messages_the_special_tokens_and_the_generation_prompt() -> None:
    tokenizer = make(tokenizer_config())
    messages = [{"role": "system", "content": "a cat"}, {"role": "user", "content": "why"}]
    text = tokenizer.render_chat(messages)
    assert text == "<s><|system|> a cat <|user|> why <|assistant|>"
    ids = tokenizer.encode_chat(messages)
    assert ids[0] == VOCAB["<s>"] and ids.count(VOCAB["<s>"]) == 1  # the template's BOS only
    assert ids[-1] == VOCAB["<|assistant|>"]


def test_raise_exception_in_the_template_is_a_400_with_its_message() -> None:
    tokenizer = make(tokenizer_config())
    with pytest.raises(InvalidRequestError, match="unknown role robot"):
        tokenizer.render_chat([{"role": "robot", "content": "hi"}])


def test_named_templates_use_the_default_one_and_tojson_keeps_non_ascii() -> None:
    templates = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages[0].content | tojson }}"},
    ]
    tokenizer = make({"chat_template": templates})
    assert tokenizer.render_chat([{"role": "user", "content": "Grüße <b>"}]) == '"Grüße <b>"'


def test_without_a_template_chat_is_refused_with_what_to_do() -> None:
    tokenizer = make(tokenizer_config(chat_template=None))
    assert not tokenizer.has_chat_template
    with pytest.raises(InvalidRequestError, match="use /v1/completions"):
        tokenizer.render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequestError, match="must not be empty"):
        make(tokenizer_config()).render_chat([])
