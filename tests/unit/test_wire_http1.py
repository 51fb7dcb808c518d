"""extproc.wire.http1.read_response: the framings and the malformed answers."""

import asyncio

import pytest

from extproc.wire.http1 import read_response


def _reader(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_content_length_body_and_lower_case_headers():
    status, headers, body = await read_response(_reader(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhelloEXTRA"))
    assert (status, headers["x-a"], body) == (200, "b", b"hello")


async def test_chunked_body_with_trailers():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n"
    assert (await read_response(_reader(raw)))[2] == b"abcde"


async def test_no_length_reads_to_close_unless_keep_alive():
    raw = b"HTTP/1.1 503 Busy\r\n\r\nrest"
    assert (await read_response(_reader(raw)))[:3:2] == (503, b"rest")
    assert (await read_response(_reader(raw, eof=False), keep_alive=True))[2] == b""


@pytest.mark.parametrize("raw", [b"", b"garbage\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n",
                                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"])
async def test_malformed_answers_are_value_errors(raw):
    with pytest.raises(ValueError):
        await read_response(_reader(raw))
