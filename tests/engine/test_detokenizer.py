"""Incremental text never contains a broken character, and stop strings cut it cleanly."""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer

TEXT = "Grüße 🚀 東京 — naïve café ✨ done"


def stream(tokenizer, text, stop=()):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [1], stop)
    pieces = []
    for token_id in ids:
        detok.add(token_id)
        pieces.append(detok.emittable(finished=False))
        if detok.stopped_by:
            break
    detok.flush()
    pieces.append(detok.emittable(finished=True))
    return detok, pieces


def test_streamed_pieces_are_whole_characters_and_add_up(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.split())  # multi-byte characters span several tokens
    detok, pieces = stream(tokenizer, TEXT)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT == detok.text


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    detok, pieces = stream(tokenizer, TEXT, stop=("東京",))
    assert detok.stopped_by == "東京"
    assert detok.text == "Grüße 🚀 "
    assert "".join(pieces) == "Grüße 🚀 "


def test_earliest_of_several_stop_strings_wins(tokenizer):
    detok, _ = stream(tokenizer, "alpha beta gamma delta", stop=("delta", "beta"))
    assert detok.text == "alpha " and detok.stopped_by == "beta"
