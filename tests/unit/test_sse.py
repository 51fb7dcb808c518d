"""Unit tests for extproc.formats.sse: incremental parsing under every split, encoding."""

from __future__ import annotations

import itertools
import json

import pytest

from extproc.formats.sse import DONE, SSEEvent, SSEParser, encode_event


def parse_all(chunks) -> list[SSEEvent]:
    p = SSEParser()
    out: list[SSEEvent] = []
    for c in chunks:
        out += p.feed(c)
    out += p.flush()
    return out


def splits(stream: bytes, parts: int):
    """Every way of cutting `stream` into `parts` chunks (chunks may be empty)."""
    n = len(stream)
    for cuts in itertools.combinations_with_replacement(range(n + 1), parts - 1):
        bounds = (0, *cuts, n)
        yield [stream[a:b] for a, b in zip(bounds, bounds[1:])]


E = SSEEvent

STREAMS = {
    "lf": (b"data: a\n\ndata: b\n\n", [E("a"), E("b")]),
    "crlf": (b"data: a\r\n\r\ndata: b\r\n\r\n", [E("a"), E("b")]),
    "cr": (b"data: a\r\rdata: b\r\r", [E("a"), E("b")]),
    "mixed_endings": (b"data: a\r\ndata: b\r\n\ndata: c\r\r\n", [E("a\nb"), E("c")]),
    "no_space": (b"data:x\n\ndata:  y\n\n", [E("x"), E(" y")]),
    "multiline": (b"data: one\ndata: two\ndata:\n\n", [E("one\ntwo\n")]),
    "comments": (b": keepalive\n\n:x\ndata: a\n: mid\n\n", [E("a")]),
    "event_and_id": (b"event: delta\nid: 7\ndata: {\"a\":1}\n\n", [E('{"a":1}', "delta", "7")]),
    "no_data_no_event": (b"event: ping\n\nid: 3\n\ndata: a\n\n", [E("a")]),
    "utf8": ("data: héllo → 🙂\n\n".encode(), [E("héllo → 🙂")]),
    "field_without_colon": (b"data\n\ndata: x\nretry: 5\nfoo: bar\n\n", [E(""), E("x")]),
    "unterminated": (b"data: a\n\ndata: tail", [E("a"), E("tail")]),
    "unterminated_after_line": (b"data: a\ndata: b\n", [E("a\nb")]),
    "done": (b"data: {\"x\": 1}\n\ndata: [DONE]\n\n", [E('{"x": 1}'), E("[DONE]")]),
    "bom": (b"\xef\xbb\xbfdata: a\n\n", [E("a")]),
    "trailing_cr": (b"data: a\r\r", [E("a")]),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_whole_stream(name):
    stream, expected = STREAMS[name]
    assert parse_all([stream]) == expected


@pytest.mark.parametrize("name", list(STREAMS))
def test_every_split_in_two_and_three(name):
    stream, expected = STREAMS[name]
    for parts in (2, 3):
        for chunks in splits(stream, parts):
            assert parse_all(chunks) == expected, chunks


@pytest.mark.parametrize("name", ["lf", "crlf", "cr", "utf8", "multiline"])
def test_byte_by_byte(name):
    stream, expected = STREAMS[name]
    assert parse_all([bytes([b]) for b in stream]) == expected


def test_events_returned_as_soon_as_complete():
    p = SSEParser()
    assert p.feed(b"data: a\n") == []
    assert p.feed(b"\n") == [E("a")]
    assert p.feed(b"data: b\n\ndata: c\n\ndata: d") == [E("b"), E("c")]
    assert p.feed(b"") == []
    assert p.flush() == [E("d")]
    assert p.flush() == []


def test_cr_then_lf_in_next_chunk_is_one_line_ending():
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\n") == []  # the \n belongs to the \r: no blank line yet
    assert p.feed(b"\r") == [E("a")]  # this is the blank line
    assert p.feed(b"\ndata: b\n\n") == [E("b")]


def test_cr_then_empty_chunk_then_lf():
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"") == []
    assert p.feed(b"\n\n") == [E("a")]


def test_split_inside_multibyte_char():
    data = "data: 🙂\n\n".encode()
    i = data.index(b"\xf0") + 2
    p = SSEParser()
    assert p.feed(data[:i]) == []
    assert p.feed(data[i:]) == [E("🙂")]


def test_invalid_utf8_replaced():
    assert parse_all([b"data: \xff\n\n"]) == [E("\ufffd")]


def test_flush_empty_and_comment_only():
    assert SSEParser().flush() == []
    assert parse_all([b": only a comment"]) == []
    assert parse_all([b"\xef\xbb"]) == []


def test_many_small_chunks_of_one_long_line():
    payload = "x" * 10_000
    stream = f"data: {payload}\n\n".encode()
    assert parse_all([stream[i : i + 7] for i in range(0, len(stream), 7)]) == [E(payload)]


def test_id_with_nul_ignored():
    assert parse_all([b"id: a\x00b\ndata: x\n\n"]) == [E("x")]


# --------------------------------------------------------------------------- encoding


def test_encode_str_bytes_dict():
    assert encode_event("hello") == b"data: hello\n\n"
    assert encode_event(b"hello") == b"data: hello\n\n"
    assert encode_event({"a": [1, 2], "b": "é"}) == b'data: {"a":[1,2],"b":"\\u00e9"}\n\n'
    assert encode_event([1]) == b"data: [1]\n\n"


def test_encode_multiline_roundtrip():
    for text in ["a\nb", "a\r\nb", "a\rb", "a\n", "\n", "", "x\n\ny"]:
        enc = encode_event(text)
        assert enc.endswith(b"\n\n")
        expected = text.replace("\r\n", "\n").replace("\r", "\n")
        assert parse_all([enc]) == [E(expected)], text


def test_encode_event_and_id():
    enc = encode_event("x", event="delta", id="9")
    assert enc == b"event: delta\nid: 9\ndata: x\n\n"
    assert parse_all([enc]) == [E("x", "delta", "9")]


def test_encode_dict_roundtrip():
    obj = {"choices": [{"delta": {"content": "line1\nline2 🙂"}}]}
    (ev,) = parse_all([encode_event(obj)])
    assert json.loads(ev.data) == obj


def test_done():
    assert DONE == b"data: [DONE]\n\n"
    assert parse_all([DONE]) == [E("[DONE]")]
