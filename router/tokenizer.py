"""The router's tokenizer and chat template, built from what a worker's Info() returns.

Workers send the model's HF `tokenizer.json` and `tokenizer_config.json`. The router
encodes with the `tokenizers` library and renders the chat template with a sandboxed
jinja2 environment set up the way transformers sets up its own, so that prompts come
out token for token the same, without importing torch or transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from proto.tandem.internal.v1 import worker_pb2
from router.errors import InvalidRequestError

Message = Mapping[str, Any]

# The special tokens a chat template may refer to, as transformers passes them.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class RouterTokenizer:
    """Encode, decode and apply the chat template of one model."""

    def __init__(self, tokenizer: Tokenizer, config: Mapping[str, Any]) -> None:
        self._tokenizer = tokenizer
        self._special_tokens = {
            name: _token_text(config[name]) for name in SPECIAL_TOKEN_NAMES if config.get(name)
        }
        source = _default_template(config.get("chat_template"))
        self._chat_template = _compile(source) if source else None

    @classmethod
    def from_info(cls, info: worker_pb2.InstanceInfo) -> RouterTokenizer:
        if not info.tokenizer_json:
            raise ValueError(f"instance {info.instance_id!r} sent no tokenizer.json in its Info")
        tokenizer = Tokenizer.from_str(info.tokenizer_json.decode("utf-8"))
        config = json.loads(info.tokenizer_config_json) if info.tokenizer_config_json else {}
        return cls(tokenizer, config)

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Message]) -> str:
        """The conversation as text, ending where the assistant's reply begins."""
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if self._chat_template is None:
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions with a plain prompt",
                param="messages",
            )
        try:
            return self._chat_template.render(
                messages=list(messages), add_generation_prompt=True, **self._special_tokens
            )
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"the chat template refused the messages: {e}") from e

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        # The template writes the special tokens (BOS) itself.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _token_text(token: str | Mapping[str, Any]) -> str:
    """A special token as tokenizer_config.json holds it: a string or an AddedToken dict."""
    return token if isinstance(token, str) else str(token["content"])


def _default_template(template: str | list[Mapping[str, str]] | None) -> str | None:
    """tokenizer_config.json holds one template, or a list of named ones; take 'default'."""
    if template is None or isinstance(template, str):
        return template
    named = {t["name"]: t["template"] for t in template}
    return named.get("default")


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
