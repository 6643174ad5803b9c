"""Incremental detokenization that never emits a broken UTF-8 character, with stop strings.

Text is decoded over a sliding window of tokens [prefix_offset, len): the
new text is what that decode adds beyond the decode of [prefix_offset,
read_offset). While the decode ends in U+FFFD (a character split across
tokens), nothing is emitted and the window waits for the next token.

Stop strings: the text is cut before the first stop string found. For
streaming, `emittable()` holds back a tail that could still be the start of a
stop string.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens, for spacing


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""
        self.stopped_by: str | None = None
        self._num_emitted = 0

    def add(self, token_id: int) -> None:
        """Appends one output token; sets `stopped_by` when a stop string appears."""
        self._ids.append(token_id)
        before = self._decode(self._prefix_offset, self._read_offset)
        after = self._decode(self._prefix_offset, len(self._ids))
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._append_text(after[len(before) :])

    def flush(self) -> None:
        """At the end of generation: emits whatever is still pending, even a partial character."""
        before = self._decode(self._prefix_offset, self._read_offset)
        after = self._decode(self._prefix_offset, len(self._ids))
        if len(after) > len(before) and self.stopped_by is None:
            self._append_text(after[len(before) :])
        self._prefix_offset = self._read_offset = len(self._ids)

    def emittable(self, finished: bool) -> str:
        """Text not yet emitted that can no longer become part of a stop string."""
        hold_back = 0 if finished or self.stopped_by else max(self._max_stop_len - 1, 0)
        end = max(len(self.text) - hold_back, self._num_emitted)
        new = self.text[self._num_emitted : end]
        self._num_emitted = end
        return new

    def _append_text(self, delta: str) -> None:
        if self.stopped_by is not None:
            return
        search_from = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += delta
        found = [(i, s) for s in self._stop if (i := self.text.find(s, search_from)) != -1]
        if found:
            index, stop = min(found)
            self.text = self.text[:index]
            self.stopped_by = stop

    def _decode(self, start: int, end: int) -> str:
        return str(self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True))
