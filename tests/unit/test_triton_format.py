"""Unit tests for extproc.formats.triton: OpenAI <-> Triton generate translation."""

from __future__ import annotations

import itertools
import json
from typing import Literal, Optional

import pytest
from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.formats.openai import OpenAIError, Usage, parse_request
from extproc.formats.sse import SSEParser
from extproc.formats.triton import (
    StreamTranslator,
    check_supported,
    error_from_triton,
    generate_body,
    generate_path,
    gather_stream,
)


class _StreamChoice(CompletionChoice):
    # OpenAI sends finish_reason null on intermediate completion chunks; its type says required
    finish_reason: Optional[Literal["stop", "length", "content_filter"]] = None  # noqa: UP007


class _StreamCompletion(Completion):
    choices: list[_StreamChoice]


def chat_req(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return parse_request("chat", json.dumps(body).encode())


def comp_req(**kw):
    body = {"model": "m", "prompt": "once upon"}
    body.update(kw)
    return parse_request("completions", json.dumps(body).encode())


def ev(text="", pt=None, ct=None, fr="", **extra) -> bytes:
    d = {"model_name": "llm", "model_version": "1", "text_output": text}
    if pt is not None:
        d["prompt_tokens"] = pt
    if ct is not None:
        d["completion_tokens"] = ct
    d["finish_reason"] = fr
    d.update(extra)
    return b"data: " + json.dumps(d, ensure_ascii=False).encode() + b"\n\n"


def out_events(data: bytes) -> list:
    """Parse translated SSE output: JSON objects, and the string "[DONE]"."""
    p = SSEParser()
    evs = p.feed(data) + p.flush()
    return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in evs]


def validate(events: list, endpoint: str) -> None:
    for e in events:
        if e == "[DONE]" or "error" in e:
            continue
        if endpoint == "chat":
            ChatCompletionChunk.model_validate(e)
        else:
            _StreamCompletion.model_validate(e)


def run(t: StreamTranslator, chunks) -> bytes:
    return b"".join(t.feed(c) for c in chunks) + t.finish()


# --------------------------------------------------------------------------- check_supported

UNSUPPORTED = [
    (chat_req(n=2), "n"),
    (chat_req(logprobs=True), "logprobs"),
    (chat_req(top_logprobs=2), "top_logprobs"),
    (comp_req(logprobs=0), "logprobs"),
    (chat_req(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (chat_req(functions=[{"name": "f"}]), "functions"),
    (chat_req(tool_choice="auto"), "tool_choice"),
    (chat_req(tool_choice="required"), "tool_choice"),
    (chat_req(tool_choice={"type": "function", "function": {"name": "f"}}), "tool_choice"),
    (chat_req(function_call="auto"), "function_call"),
    (chat_req(response_format={"type": "json_object"}), "response_format"),
    (chat_req(response_format={"type": "json_schema", "json_schema": {}}), "response_format"),
    (comp_req(best_of=2), "best_of"),
    (comp_req(echo=True), "echo"),
    (chat_req(logit_bias={"50256": -100}), "logit_bias"),
    (comp_req(suffix="end"), "suffix"),
    (chat_req(presence_penalty=0.5), "presence_penalty"),
    (chat_req(frequency_penalty=-1), "frequency_penalty"),
    (chat_req(audio={"voice": "x"}), "audio"),
    (chat_req(modalities=["text", "audio"]), "modalities"),
    (chat_req(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                    {"type": "image_url", "image_url": {"url": "u"}}]}]),
     "messages[0].content[1].type"),
]


@pytest.mark.parametrize("req, param", UNSUPPORTED)
def test_check_supported_rejects(req, param):
    with pytest.raises(OpenAIError) as ei:
        check_supported(req)
    e = ei.value
    assert (e.status, e.param, e.code) == (400, param, "unsupported_parameter")
    assert f"'{param}'" in e.message and "Triton" in e.message


@pytest.mark.parametrize(
    "req",
    [
        chat_req(),
        chat_req(n=1, logprobs=False, top_logprobs=0, tools=[], tool_choice="none", function_call="none",
                 response_format={"type": "text"}, logit_bias={}, presence_penalty=0, frequency_penalty=0.0,
                 modalities=["text"], seed=1, stop=["x"], user="u", stream=True, temperature=0.1, top_p=0.9),
        comp_req(best_of=1, echo=False, suffix="", logprobs=None),
        chat_req(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}]}]),
    ],
)
def test_check_supported_accepts(req):
    check_supported(req)


# --------------------------------------------------------------------------- request


@pytest.mark.parametrize(
    "model, stream, path",
    [
        ("llm", False, "/v2/models/llm/generate"),
        ("llm", True, "/v2/models/llm/generate_stream"),
        ("org/model name", False, "/v2/models/org%2Fmodel%20name/generate"),
        ("ünï", True, "/v2/models/%C3%BCn%C3%AF/generate_stream"),
        ("../x?y#z", False, "/v2/models/..%2Fx%3Fy%23z/generate"),
    ],
)
def test_generate_path(model, stream, path):
    assert generate_path(model, stream) == path


def test_generate_body_minimal():
    body = json.loads(generate_body(chat_req(), "PROMPT", default_max_tokens=64))
    assert body == {"text_input": "PROMPT", "max_tokens": 64, "stream": False}


def test_generate_body_full():
    req = chat_req(max_tokens=5, temperature=0, top_p=0.9, seed=42, stop=["\n", "", "END"], stream=True)
    body = json.loads(generate_body(req, "P", default_max_tokens=64))
    assert body == {"text_input": "P", "max_tokens": 5, "stream": True, "temperature": 0.0, "top_p": 0.9,
                    "random_seed": 42, "stop_words": ["\n", "END"]}


def test_generate_body_edge_values():
    body = json.loads(generate_body(chat_req(seed=-1, stop=[""]), "é🙂", default_max_tokens=1))
    assert body["random_seed"] == 2**64 - 1
    assert "stop_words" not in body
    assert body["text_input"] == "é🙂"
    assert json.loads(generate_body(chat_req(max_completion_tokens=7), "", default_max_tokens=1))["max_tokens"] == 7


# --------------------------------------------------------------------------- non-streamed
# The gateway always streams from Triton; a client that did not ask for a stream gets the events
# gathered into one JSON (gather_stream). A decoupled model's one final response is one event.


def translate_generate_response(body: bytes, **kw):
    """One Triton generate JSON, as the single event of a generate_stream answer, gathered."""
    return gather_stream(b"data: " + body + b"\n\n", **kw)


def test_gather_stream_joins_the_events_of_a_stream():
    out, usage = gather_stream(CHAT_STREAM, req=chat_req(), completion_id="chatcmpl-1", created=5, model="pub")
    c = ChatCompletion.model_validate_json(out)
    assert c.choices[0].message.content == "Hello wörld 🙂" and c.choices[0].finish_reason == "stop"
    assert usage == Usage(7, 3)
    # a last event without its blank line, and no finish_reason: still gathered, finish inferred
    out, usage = gather_stream(b'data: {"text_output": "ab", "completion_tokens": 2}', req=chat_req(max_tokens=2),
                               completion_id="x", created=1, model="m")
    assert json.loads(out)["choices"][0]["finish_reason"] == "length" and usage.completion_tokens == 2


def test_gather_stream_of_nothing_is_the_model_servers_failure():
    with pytest.raises(OpenAIError) as ei:
        gather_stream(b"", req=chat_req(), completion_id="x", created=1, model="m")
    assert ei.value.status == 502 and "without sending any event" in ei.value.message


def triton_response(**kw) -> bytes:
    d = {"model_name": "llm", "model_version": "1", "text_output": "Hello there",
         "prompt_tokens": 9, "completion_tokens": 2, "finish_reason": "stop"}
    d.update(kw)
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


def test_translate_chat():
    out, usage = translate_generate_response(
        triton_response(), req=chat_req(), completion_id="chatcmpl-1", created=123, model="public-name")
    c = ChatCompletion.model_validate_json(out)
    assert c.id == "chatcmpl-1" and c.created == 123 and c.model == "public-name"
    assert c.choices[0].message.content == "Hello there" and c.choices[0].finish_reason == "stop"
    assert usage == Usage(9, 2) and c.usage.total_tokens == 11


def test_translate_completion():
    out, usage = translate_generate_response(
        triton_response(finish_reason="length"), req=comp_req(), completion_id="cmpl-1", created=1, model="m")
    c = Completion.model_validate_json(out)
    assert c.object == "text_completion" and c.choices[0].text == "Hello there"
    assert c.choices[0].finish_reason == "length" and usage == Usage(9, 2)


def test_translate_counts_tokens_when_missing():
    seen = []

    def count(s):
        seen.append(s)
        return len(s)

    body = triton_response(prompt_tokens=..., completion_tokens=...)
    _, usage = translate_generate_response(body, req=chat_req(), completion_id="x", created=1, model="m",
                                           count_tokens=count, prompt="<rendered prompt>")
    assert usage == Usage(len("<rendered prompt>"), len("Hello there"))
    _, usage = translate_generate_response(body, req=comp_req(), completion_id="x", created=1, model="m",
                                           count_tokens=count)
    assert usage.prompt_tokens == len("once upon")
    _, usage = translate_generate_response(body, req=chat_req(), completion_id="x", created=1, model="m")
    assert usage == Usage(0, 0)


@pytest.mark.parametrize(
    "reported, ct, max_tokens, expected",
    [
        ("stop", 5, 5, "stop"),
        ("length", 1, 5, "length"),
        ("eos", 5, 5, "stop"),
        ("max_tokens", 1, None, "length"),
        ("", 5, 5, "length"),
        ("", 4, 5, "stop"),
        (None, 6, 5, "length"),
        ("", 100, None, "stop"),
        ("weird", 5, 5, "length"),
        (["length"], 1, 5, "length"),
        (["a", "b"], 1, 5, "stop"),
    ],
)
def test_translate_finish_reason(reported, ct, max_tokens, expected):
    out, _ = translate_generate_response(
        triton_response(finish_reason=reported, completion_tokens=ct), req=chat_req(), completion_id="x",
        created=1, model="m", max_tokens=max_tokens)
    assert json.loads(out)["choices"][0]["finish_reason"] == expected


def test_translate_finish_uses_req_max_tokens():
    out, _ = translate_generate_response(triton_response(finish_reason="", completion_tokens=3),
                                         req=chat_req(max_tokens=3), completion_id="x", created=1, model="m")
    assert json.loads(out)["choices"][0]["finish_reason"] == "length"


def test_translate_list_outputs():
    out, usage = translate_generate_response(
        triton_response(text_output=["a b"], prompt_tokens=[4], completion_tokens=[2.0]),
        req=chat_req(), completion_id="x", created=1, model="m")
    assert json.loads(out)["choices"][0]["message"]["content"] == "a b" and usage == Usage(4, 2)
    out, _ = translate_generate_response(triton_response(text_output=["a", "b"]), req=chat_req(),
                                         completion_id="x", created=1, model="m")
    assert json.loads(out)["choices"][0]["message"]["content"] == "ab"


def test_translate_non_ascii():
    out, _ = translate_generate_response(triton_response(text_output="café 🙂"), req=chat_req(),
                                         completion_id="x", created=1, model="m")
    assert json.loads(out)["choices"][0]["message"]["content"] == "café 🙂"


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b'{"error": "failed to run model: out of memory"}', 502, "out of memory"),
        (b'{"error": {"message": "nested"}}', 502, "nested"),
        (b"not json", 502, "not valid JSON"),
        (b"{", 502, "not valid JSON"),
        (b"[1]", 502, "not a JSON object"),
        (b'{"text_output": 5}', 502, "non-string"),
        (b'{"text_output": {"a": 1}}', 502, "non-string"),
    ],
)
def test_translate_errors(body, status, needle):
    with pytest.raises(OpenAIError) as ei:
        translate_generate_response(body, req=chat_req(), completion_id="x", created=1, model="m")
    assert ei.value.status == status and needle in ei.value.message


@pytest.mark.parametrize(
    "status, body, expected_status, needle",
    [
        (400, b'{"error":"input too long"}', 400, "input too long"),
        (500, b'{"error":"boom"}', 502, "boom"),
        (503, b"Service Unavailable", 503, "Service Unavailable"),
        (504, b"", 504, "(empty body)"),
        (404, b'{"error":"Request for unknown model: \'x\' is not found"}', 502, "unknown model"),
    ],
)
def test_error_from_triton(status, body, expected_status, needle):
    e = error_from_triton(status, body)
    assert e.status == expected_status and needle in e.message


# --------------------------------------------------------------------------- streamed

CHAT_STREAM = (
    ev("Hel", pt=7, ct=1) + ev("lo ", pt=7, ct=2) + ev("wörld 🙂", pt=7, ct=3) + ev("", pt=7, ct=3, fr="stop")
)


def translate(chunks, req=None, **kw) -> tuple[StreamTranslator, bytes]:
    t = StreamTranslator(req=req or chat_req(stream=True), completion_id="chatcmpl-1", created=5, model="pub", **kw)
    return t, run(t, chunks)


def test_stream_chat_shape():
    t, out = translate([CHAT_STREAM])
    evs = out_events(out)
    validate(evs, "chat")
    assert evs[-1] == "[DONE]" and evs.count("[DONE]") == 1
    chunks = evs[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == ["Hel", "lo ", "wörld 🙂"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:4])
    final = chunks[4]
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert len(chunks) == 5  # no include_usage chunk
    assert all(c["id"] == "chatcmpl-1" and c["model"] == "pub" and c["created"] == 5 for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert t.text == "Hello wörld 🙂" and t.usage == Usage(7, 3) and t.finish_reason == "stop"
    assert t.error is None and t.done


def test_stream_done_emitted_on_final_event_then_nothing():
    t = StreamTranslator(req=chat_req(stream=True), completion_id="c", created=1, model="m")
    out = t.feed(CHAT_STREAM)
    assert out.endswith(b"data: [DONE]\n\n") and out.count(b"[DONE]") == 1
    assert t.feed(ev("late")) == b""
    assert t.finish() == b""
    assert t.finish() == b""


def test_stream_include_usage():
    t, out = translate([CHAT_STREAM], req=chat_req(stream=True, stream_options={"include_usage": True}))
    evs = out_events(out)
    validate(evs, "chat")
    assert evs[-1] == "[DONE]"
    assert evs[-2]["choices"] == [] and evs[-2]["usage"]["total_tokens"] == 10
    assert evs[-3]["choices"][0]["finish_reason"] == "stop" and evs[-3]["usage"]["total_tokens"] == 10


def test_stream_with_openai_client_stream_parser():
    """The official client's own SSE decoder reads our output."""
    from openai._streaming import SSEDecoder

    _, out = translate([CHAT_STREAM], req=chat_req(stream=True, stream_options={"include_usage": True}))
    decoded = list(SSEDecoder().iter_bytes(iter([out])))
    assert decoded[-1].data == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(s.data)) for s in decoded[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello wörld 🙂"
    assert chunks[-1].usage.total_tokens == 10


def test_stream_completions():
    req = comp_req(stream=True, stream_options={"include_usage": True})
    t = StreamTranslator(req=req, completion_id="cmpl-1", created=5, model="pub")
    evs = out_events(run(t, [ev("a", pt=2, ct=1) + ev("b", pt=2, ct=2) + ev("", pt=2, ct=2, fr="length")]))
    validate(evs, "completions")
    assert evs[-1] == "[DONE]"
    assert [e["choices"][0]["text"] for e in evs[:3]] == ["a", "b", ""]
    assert [e["choices"][0]["finish_reason"] for e in evs[:3]] == [None, None, "length"]
    assert evs[2]["usage"]["total_tokens"] == 4
    assert evs[3]["choices"] == [] and evs[3]["object"] == "text_completion"
    assert all(e["object"] == "text_completion" for e in evs[:-1])


def _all_splits(stream: bytes, parts: int):
    n = len(stream)
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        yield [stream[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_every_two_way_split_translates_the_same(endpoint):
    req = chat_req(stream=True) if endpoint == "chat" else comp_req(stream=True)
    stream = CHAT_STREAM.replace(b"\n", b"\r\n")  # also split between \r and \n
    _, whole = translate([stream], req=req)
    for chunks in _all_splits(stream, 2):
        _, out = translate(chunks, req=req)
        assert out == whole, chunks


def test_stream_every_three_way_split_translates_the_same():
    stream = b'data: {"text_output":"\xc3\xa9\xf0\x9f\x99\x82","completion_tokens":1}\n\ndata:{"text_output":"z","finish_reason":"stop"}\n\n'
    _, whole = translate([stream])
    evs = out_events(whole)
    assert [e["choices"][0]["delta"].get("content") for e in evs[:-1]] == ["", "é🙂", "z", None]
    for chunks in _all_splits(stream, 3):
        _, out = translate(chunks)
        assert out == whole, chunks


def test_stream_event_split_across_chunks_emits_when_complete():
    t = StreamTranslator(req=chat_req(stream=True), completion_id="c", created=1, model="m")
    e = ev("Hi", ct=1)
    assert t.feed(e[:10]) == b""
    out = t.feed(e[10:])
    assert [x["choices"][0]["delta"] for x in out_events(out)] == [{"role": "assistant", "content": ""}, {"content": "Hi"}]


def test_stream_without_finish_reason_infers_on_finish():
    t, out = translate([ev("a", ct=1), ev("b", ct=2)], req=chat_req(stream=True, max_tokens=2))
    evs = out_events(out)
    assert evs[-2]["choices"][0]["finish_reason"] == "length" and evs[-1] == "[DONE]"
    assert t.finish_reason == "length"
    t, out = translate([ev("a", ct=1)], req=chat_req(stream=True, max_tokens=2))
    assert t.finish_reason == "stop"
    t, out = translate([ev("a", ct=1)], req=chat_req(stream=True), max_tokens=1)
    assert t.finish_reason == "length"


def test_stream_trailing_event_without_blank_line_flushed():
    t, out = translate([ev("a", ct=1) + ev("b", ct=2, fr="stop").rstrip(b"\n")])
    assert t.text == "ab" and t.finish_reason == "stop"
    assert out.count(b"[DONE]") == 1


def test_stream_counts_tokens_when_not_reported():
    t, out = translate([ev("abc") + ev("de", fr="stop")], count_tokens=len, prompt="12345")
    assert t.usage == Usage(5, 5)
    assert out_events(out)[-2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    t, _ = translate([ev("abc") + ev("de", fr="stop")])
    assert t.usage == Usage(0, 0)


def test_stream_empty_upstream():
    t, out = translate([])
    evs = out_events(out)
    validate(evs, "chat")
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert evs[1]["choices"][0]["finish_reason"] == "stop" and evs[1]["usage"]["total_tokens"] == 0
    assert evs[2] == "[DONE]" and len(evs) == 3


def test_stream_ignores_comments_and_upstream_done():
    t, out = translate([b": ping\n\n" + ev("a", ct=1) + b"data: [DONE]\n\n"])
    assert t.text == "a" and out.count(b"[DONE]") == 1


def test_stream_finish_reason_mapping():
    t, _ = translate([ev("a", ct=1, fr="eos")])
    assert t.finish_reason == "stop"
    t, _ = translate([ev("a", ct=1, fr="max_tokens")])
    assert t.finish_reason == "length"


@pytest.mark.parametrize(
    "bad, needle",
    [
        (b'data: {"error": "model crashed"}\n\n', "model crashed"),
        (b"data: {not json\n\n", "not valid JSON"),
        (b"data: [1,2]\n\n", "not a JSON object"),
        (b'data: {"text_output": 3}\n\n', "non-string"),
    ],
)
def test_stream_error_mid_stream(bad, needle):
    t = StreamTranslator(req=chat_req(stream=True), completion_id="c", created=1, model="m")
    first = t.feed(ev("a", ct=1))
    out = t.feed(bad + ev("never", ct=2))
    evs = out_events(out)
    assert evs == [{"error": t.error.to_dict()["error"]}, "[DONE]"]
    assert needle in evs[0]["error"]["message"] and t.error.status == 502
    assert set(evs[0]["error"]) == {"message", "type", "param", "code"}
    assert t.text == "a" and t.usage is None
    assert t.feed(ev("more")) == b"" and t.finish() == b""
    assert (first + out).count(b"[DONE]") == 1


def test_stream_error_in_flushed_tail():
    t = StreamTranslator(req=chat_req(stream=True), completion_id="c", created=1, model="m")
    t.feed(ev("a"))
    assert t.feed(b'data: {"error": "x"}') == b""  # not terminated yet
    evs = out_events(t.finish())
    assert evs == [{"error": t.error.to_dict()["error"]}, "[DONE]"]  # no finish chunk after an error


def test_stream_fail_from_caller():
    from extproc.formats.openai import upstream_error

    t = StreamTranslator(req=chat_req(stream=True), completion_id="c", created=1, model="m")
    t.feed(ev("a"))
    out = t.fail(upstream_error(0, "connection reset"))
    evs = out_events(out)
    assert evs[0]["error"]["code"] == "upstream_unavailable" and evs[1] == "[DONE]"
    assert t.fail(upstream_error(0, "again")) == b"" and t.finish() == b""


def test_stream_translator_escapes_ids_and_models():
    t = StreamTranslator(req=chat_req(stream=True), completion_id='c"1', created=1, model='m\\"x')
    evs = out_events(run(t, [ev("a\"b\n", ct=1, fr="stop")]))
    assert evs[0]["id"] == 'c"1' and evs[0]["model"] == 'm\\"x'
    assert evs[1]["choices"][0]["delta"]["content"] == 'a"b\n'


def test_stream_text_and_last_text():
    t = StreamTranslator(req=chat_req(stream=True), completion_id="c", created=1, model="m", count_tokens=len)
    t.feed(ev("ab", ct=1) + ev("c", ct=2))
    assert t.last_text == "abc" and t.text == "abc"
    t.feed(ev("d")[:5])
    assert t.last_text == "" and t.text == "abc"
    t.feed(ev("d")[5:] + ev("", fr="stop"))
    assert t.last_text == "d" and t.text == "abcd" and t.text == "abcd"
    assert t.usage == Usage(len("hi"), 2)
    t.finish()
    assert t.last_text == ""
    t2 = StreamTranslator(req=chat_req(stream=True), completion_id="c", created=1, model="m", count_tokens=len)
    t2.feed(ev("x"))
    t2.feed(ev("yz").rstrip(b"\n"))
    t2.finish()
    assert t2.last_text == "yz" and t2.text == "xyz" and t2.usage.completion_tokens == 3
    t3 = StreamTranslator(req=chat_req(stream=True), completion_id="c", created=1, model="m")
    t3.feed(ev("p") + b'data: {"error": "x"}\n\n')
    assert t3.last_text == "p" and t3.error is not None
