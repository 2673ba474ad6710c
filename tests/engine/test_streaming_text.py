"""Incremental detokenization and stop strings in the streamed text."""

from __future__ import annotations

from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.engine import _stream_delta
from services.engine.sequence import FinishReason
from tests.engine.engine_fixtures import CharTokenizer


def stream(text: str, stops: tuple[str, ...], finish_at_stop: bool = True) -> tuple[str, bool]:
    """Feed text one token at a time; -> (what the client received, whether a stop string ended it)."""
    tok = CharTokenizer()
    detok = IncrementalDetokenizer(tok)
    ids, out = [], ""
    for token in tok.encode(text):
        ids.append(token)
        detok.push(ids)
        stopped = finish_at_stop and any(s in detok.text for s in stops)
        last = len(ids) == len(text)
        out += _stream_delta(detok, stops, FinishReason.STOP if stopped else FinishReason.LENGTH if last else None)
        if stopped:
            return out, True
    return out, False


def test_text_before_a_stop_string_is_never_streamed_past_it():
    assert stream("abc<END>def", ("<END>",)) == ("abc", True)


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    out, stopped = stream("x<EN!y", ("<END>",))
    assert (out, stopped) == ("x<EN!y", False)


def test_earliest_of_several_stop_strings_wins():
    assert stream("hello world. bye", ("bye", "world"))[0] == "hello "


def test_no_stop_strings_streams_everything():
    assert stream("plain text", ()) == ("plain text", False)


def test_detokenizer_emits_each_character_once():
    tok = CharTokenizer()
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("streaming")
    pieces = [detok.push(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(pieces) == "streaming" and detok.text == "streaming"
