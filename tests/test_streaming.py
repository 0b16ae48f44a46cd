"""Streaming pieces: joined, they are exactly the final answer (`StreamText`), whatever the decoder
shows along the way (leading/trailing whitespace, half a UTF-8 character, the start of a stop)."""

from __future__ import annotations

import pytest

from tunelab.models.base import Request, StreamText
from tunelab.models.fake import FakeModel


def stream(decodes: list[str], final: str, stops=None) -> list[str]:
    pieces = StreamText(stops)
    out = [p for text in decodes for p in [pieces.feed(text)] if p]
    rest = pieces.finish(final)
    return out + ([rest] if rest else [])


@pytest.mark.parametrize("decodes, final, stops", [
    ([" Hello", " Hello wor", " Hello world", " Hello world. ", " Hello world. Bye"], "Hello world. Bye", None),
    (["Caf", "Caf\ufffd", "Café", "Café au", "Café au lait"], "Café au lait", None),  # half a character held back
    (["One", "One two", "One two\n", "One two\nUs", "One two\nUser:"], "One two", ["\nUser:"]),  # a stop's start held back
    (["a", "a b", "a b ", "a b  "], "a b", None),  # trailing whitespace is never sent
])
def test_pieces_joined_are_the_final_answer(decodes, final, stops):
    pieces = stream(decodes, final, stops)
    assert "".join(pieces) == final and len(pieces) >= 2
    assert "\ufffd" not in "".join(pieces)


def test_the_fake_model_streams_word_by_word_and_labels_whole():
    model = FakeModel()
    got: list[str] = []
    comp = model.stream(Request(messages=[{"role": "user", "content": "one two three"}]), got.append)
    assert got == ["one", " two", " three"] and comp.text == "one two three"
    got.clear()
    comp = model.stream(Request(messages=[{"role": "user", "content": "is this spam"}], labels=["spam", "ham"]),
                        got.append)
    assert got == ["spam"] == [comp.text]
