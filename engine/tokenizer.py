"""The tokenizer and chat template, from the model's own files.

A GGUF file carries its vocabulary, merges and chat template; transformers
converts them to a fast tokenizer, which takes seconds, so the converted
tokenizer is saved under TANDEM_CACHE_DIR keyed by the model's identity.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine import envs
from engine.errors import InvalidRequestError
from engine.models.source import ModelSource

Conversation = list[dict[str, Any]]


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    if source.kind == "hf":
        return AutoTokenizer.from_pretrained(str(source.path))
    cached = envs.cache_dir() / "tokenizers" / source.model_id.replace("/", "_")
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    logging.getLogger(__name__).info("converting the GGUF tokenizer of %s (once)", source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    with contextlib.suppress(OSError):  # a read-only cache only costs the conversion next time
        tokenizer.save_pretrained(str(cached))
    return tokenizer


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation
) -> list[int]:
    """Token ids of the conversation, ready for the assistant's reply."""
    if not conversation:
        raise InvalidRequestError("messages must not be empty")
    if not tokenizer.chat_template:
        raise InvalidRequestError("this model has no chat template; send a plain prompt instead")
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
