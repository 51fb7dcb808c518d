"""Unit tests for extproc.formats.openai: validation like OpenAI's, errors, builders."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from extproc.formats.openai import (
    ChatMessage,
    dumps,
    OpenAIError,
    OpenAIRequest,
    Usage,
    chat_chunk,
    chat_completion,
    internal_error,
    invalid_request,
    method_not_allowed,
    model_not_found,
    new_completion_id,
    not_found_path,
    parse_request,
    request_to_body,
    request_too_large,
    text_chunk,
    text_completion,
    unsupported_parameter,
    upstream_error,
    usage_chunk,
    usage_from_openai,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**kw) -> bytes:
    body = {"model": "m", "messages": USER}
    body.update(kw)
    return json.dumps(body).encode()


def comp(**kw) -> bytes:
    body = {"model": "m", "prompt": "hello"}
    body.update(kw)
    return json.dumps(body).encode()


def err(endpoint: str, body: bytes) -> OpenAIError:
    with pytest.raises(OpenAIError) as ei:
        parse_request(endpoint, body)
    e = ei.value
    # every error serialises to OpenAI's shape
    d = json.loads(e.to_json())
    assert set(d["error"]) == {"message", "type", "param", "code"}
    assert d["error"]["message"] == e.message
    return e


# --------------------------------------------------------------------------- errors


def test_error_shape_and_json():
    e = OpenAIError(418, "teapot", type="x", param="p", code="c")
    assert e.to_dict() == {"error": {"message": "teapot", "type": "x", "param": "p", "code": "c"}}
    assert json.loads(e.to_json()) == e.to_dict()
    assert isinstance(e, Exception) and str(e) == "teapot"
    assert "418" in repr(e)


def test_error_defaults():
    e = OpenAIError(400, "m")
    assert (e.type, e.param, e.code) == ("invalid_request_error", None, None)


@pytest.mark.parametrize(
    "e, status, type_, param, code",
    [
        (invalid_request("x", param="p", code="c"), 400, "invalid_request_error", "p", "c"),
        (invalid_request("x"), 400, "invalid_request_error", None, None),
        (unsupported_parameter("n", "nope"), 400, "invalid_request_error", "n", "unsupported_parameter"),
        (model_not_found("gpt-9"), 404, "invalid_request_error", "model", "model_not_found"),
        (request_too_large(2000, 1000), 413, "invalid_request_error", None, "request_too_large"),
        (internal_error("boom"), 500, "server_error", None, "internal_error"),
        (internal_error("boom", code="plugin_failed"), 500, "server_error", None, "plugin_failed"),
        (not_found_path("/v1/nope"), 404, "invalid_request_error", None, "unknown_url"),
        (method_not_allowed("GET"), 405, "invalid_request_error", None, "method_not_allowed"),
    ],
)
def test_error_constructors(e, status, type_, param, code):
    assert (e.status, e.type, e.param, e.code) == (status, type_, param, code)
    assert e.message


def test_error_messages():
    assert model_not_found("gpt-9").message == "The model `gpt-9` does not exist or you do not have access to it."
    assert "2000" in request_too_large(2000, 1000).message and "1000" in request_too_large(2000, 1000).message
    assert unsupported_parameter("n", "only n=1.").message == "Unsupported parameter: 'n': only n=1."
    assert not_found_path("/v1/x", method="POST").message == "Invalid URL (POST /v1/x)"
    assert not_found_path("/v1/x").message == "Invalid URL (/v1/x)"
    assert "GET" in method_not_allowed("GET", path="/v1/models").message
    assert "/v1/models" in method_not_allowed("GET", path="/v1/models").message


@pytest.mark.parametrize(
    "upstream, status, code, type_",
    [
        (400, 400, "upstream_bad_request", "invalid_request_error"),
        (422, 400, "upstream_bad_request", "invalid_request_error"),
        (408, 504, "upstream_timeout", "server_error"),
        (504, 504, "upstream_timeout", "server_error"),
        (429, 503, "upstream_unavailable", "server_error"),
        (503, 503, "upstream_unavailable", "server_error"),
        (0, 503, "upstream_unavailable", "server_error"),
        (-1, 503, "upstream_unavailable", "server_error"),
        (500, 502, "upstream_error", "server_error"),
        (502, 502, "upstream_error", "server_error"),
        (404, 502, "upstream_error", "server_error"),
        (401, 502, "upstream_error", "server_error"),
    ],
)
def test_upstream_error_mapping(upstream, status, code, type_):
    e = upstream_error(upstream, "Triton said no")
    assert (e.status, e.code, e.type) == (status, code, type_)
    assert "Triton said no" in e.message


# --------------------------------------------------------------------------- parse: happy paths


def test_parse_minimal_chat():
    r = parse_request("chat", chat())
    assert isinstance(r, OpenAIRequest)
    assert r.endpoint == "chat" and r.model == "m" and r.prompt is None
    assert r.messages == [ChatMessage("user", "hi")]
    assert (r.stream, r.max_tokens, r.temperature, r.top_p, r.stop, r.seed, r.n) == (False, None, None, None, [], None, 1)
    assert r.stream_options is None and r.user is None and not r.include_usage
    assert r.raw == json.loads(chat())


def test_parse_full_chat():
    r = parse_request(
        "chat",
        chat(
            messages=[
                {"role": "system", "content": "sys"},
                {"role": "developer", "content": "dev"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "bob"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "t1", "type": "function"}]},
                {"role": "tool", "content": "42", "tool_call_id": "t1"},
                {"role": "function", "name": "f", "content": None},
                {"role": "assistant", "content": "ok", "refusal": None, "audio": None},
            ],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=10,
            max_completion_tokens=20,
            temperature=0,
            top_p=0.5,
            stop=["a", "b"],
            seed=-3,
            n=2,
            user="u",
            presence_penalty=-2,
            frequency_penalty=1.5,
            logprobs=True,
            top_logprobs=3,
            tools=[{"type": "function"}],
            tool_choice="auto",
            response_format={"type": "json_object"},
            logit_bias={"1": 2},
            unknown_field={"kept": True},
        ),
    )
    assert r.max_tokens == 20  # max_completion_tokens wins
    assert r.temperature == 0.0 and isinstance(r.temperature, float)
    assert (r.top_p, r.stop, r.seed, r.n, r.user) == (0.5, ["a", "b"], -3, 2, "u")
    assert r.stream and r.include_usage
    assert (r.presence_penalty, r.frequency_penalty, r.logprobs, r.top_logprobs) == (-2.0, 1.5, True, 3)
    assert r.tools == [{"type": "function"}] and r.tool_choice == "auto"
    assert r.response_format == {"type": "json_object"} and r.logit_bias == {"1": 2}
    assert r.raw["unknown_field"] == {"kept": True}
    m = r.messages
    assert [x.role for x in m] == ["system", "developer", "user", "assistant", "tool", "function", "assistant"]
    assert m[2].text == "ab" and m[2].name == "bob"
    assert m[3].content is None and m[3].text == "" and m[3].tool_calls == [{"id": "t1", "type": "function"}]
    assert m[4].tool_call_id == "t1"
    assert m[6].extra == {"refusal": None, "audio": None}
    assert m[0].extra is None


def test_parse_completions():
    r = parse_request(
        "completions",
        comp(max_tokens=7, logprobs=0, best_of=1, echo=False, suffix=None, stop="\n", stream=False),
    )
    assert r.endpoint == "completions" and r.prompt == "hello" and r.messages is None
    assert (r.max_tokens, r.logprobs, r.best_of, r.echo, r.suffix, r.stop) == (7, 0, 1, False, None, ["\n"])


def test_parse_completions_prompt_list_of_one():
    assert parse_request("completions", comp(prompt=["only"])).prompt == "only"
    assert parse_request("completions", comp(prompt="")).prompt == ""


def test_completions_ignores_max_completion_tokens():
    r = parse_request("completions", comp(max_completion_tokens=3))
    assert r.max_tokens is None


def test_nulls_mean_default():
    r = parse_request(
        "chat",
        chat(
            temperature=None, top_p=None, max_tokens=None, n=None, stream=None, stop=None,
            seed=None, user=None, stream_options=None, logprobs=None, tools=None, tool_choice=None,
        ),
    )
    assert (r.temperature, r.top_p, r.max_tokens, r.n, r.stream, r.stop, r.seed, r.user) == (
        None, None, None, 1, False, [], None, None)


def test_integral_float_accepted_for_integers():
    r = parse_request("chat", chat(max_tokens=16.0, n=1.0))
    assert r.max_tokens == 16 and type(r.max_tokens) is int and r.n == 1


@pytest.mark.parametrize("body", [chat(), bytearray(chat()), memoryview(chat()), chat().decode()])
def test_body_types(body):
    assert parse_request("chat", body).model == "m"


def test_utf8_and_bom_free_body():
    r = parse_request("chat", json.dumps({"model": "m", "messages": [{"role": "user", "content": "héllo 🙂"}]}, ensure_ascii=False).encode())
    assert r.messages[0].content == "héllo 🙂"


def test_unknown_endpoint():
    with pytest.raises(ValueError):
        parse_request("embeddings", chat())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parse: errors

INVALID_JSON = [b"", b"{", b'\xef\xbb\xbf{"model":"m","prompt":"p"}', '{"model":"m","prompt":"p"}'.encode("utf-16"), b"not json", b'{"model": "m",}', b"\xff\xfe", b"[" * 100_000, b'{"a": NaN}',
                b'{"model":"m","messages":[],"temperature":Infinity}', b'{"a": -Infinity}']


@pytest.mark.parametrize("body", INVALID_JSON)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_invalid_json(endpoint, body):
    e = err(endpoint, body)
    assert (e.status, e.param, e.code) == (400, None, None)
    assert e.message.startswith("We could not parse the JSON body of your request.")


@pytest.mark.parametrize("body", [b"[]", b"1", b'"s"', b"null", b"true"])
def test_body_not_object(body):
    e = err("chat", body)
    assert (e.status, e.param, e.code) == (400, None, "invalid_type")
    assert "expected an object" in e.message


# (body, param, code) for chat
CHAT_ERRORS = [
    # model
    (b'{"messages":[{"role":"user","content":"x"}]}', "model", "missing_required_parameter"),
    (chat(model=None), "model", "missing_required_parameter"),
    (chat(model=""), "model", "missing_required_parameter"),
    (chat(model=3), "model", "invalid_type"),
    (chat(model=["m"]), "model", "invalid_type"),
    # messages
    (b'{"model":"m"}', "messages", "missing_required_parameter"),
    (chat(messages=None), "messages", "missing_required_parameter"),
    (chat(messages="hi"), "messages", "invalid_type"),
    (chat(messages={"role": "user"}), "messages", "invalid_type"),
    (chat(messages=[]), "messages", "empty_array"),
    (chat(messages=["hi"]), "messages[0]", "invalid_type"),
    (chat(messages=[USER[0], None]), "messages[1]", "invalid_type"),
    (chat(messages=[{"content": "x"}]), "messages[0].role", "missing_required_parameter"),
    (chat(messages=[{"role": 1, "content": "x"}]), "messages[0].role", "invalid_type"),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role", "invalid_value"),
    (chat(messages=[{"role": "user"}]), "messages[0].content", "missing_required_parameter"),
    (chat(messages=[{"role": "system"}]), "messages[0].content", "missing_required_parameter"),
    (chat(messages=[{"role": "user", "content": None}]), "messages[0].content", "invalid_type"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "invalid_type"),
    (chat(messages=[{"role": "user", "content": {"type": "text"}}]), "messages[0].content", "invalid_type"),
    (chat(messages=[{"role": "user", "content": True}]), "messages[0].content", "invalid_type"),
    (chat(messages=[{"role": "user", "content": []}]), "messages[0].content", "empty_array"),
    (chat(messages=[{"role": "user", "content": ["text"]}]), "messages[0].content[0]", "invalid_type"),
    (chat(messages=[{"role": "user", "content": [{"text": "a"}]}]), "messages[0].content[0].type", "missing_required_parameter"),
    (chat(messages=[{"role": "user", "content": [{"type": 1}]}]), "messages[0].content[0].type", "invalid_type"),
    (chat(messages=[{"role": "user", "content": [{"type": "video"}]}]), "messages[0].content[0].type", "invalid_value"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text", "missing_required_parameter"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]), "messages[0].content[0].text", "invalid_type"),
    (chat(messages=[{"role": "user", "content": "x", "name": 1}]), "messages[0].name", "invalid_type"),
    (chat(messages=[{"role": "assistant", "content": "x", "tool_calls": {}}]), "messages[0].tool_calls", "invalid_type"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id", "missing_required_parameter"),
    (chat(messages=[{"role": "tool", "content": "x", "tool_call_id": 5}]), "messages[0].tool_call_id", "invalid_type"),
    (chat(messages=[{"role": "function", "content": "x"}]), "messages[0].name", "missing_required_parameter"),
    (chat(messages=[USER[0], {"role": "user", "content": 1}]), "messages[1].content", "invalid_type"),
    # numbers
    (chat(temperature="1"), "temperature", "invalid_type"),
    (chat(temperature=True), "temperature", "invalid_type"),
    (chat(temperature=False), "temperature", "invalid_type"),
    (chat(temperature=[1]), "temperature", "invalid_type"),
    (chat(temperature=-0.1), "temperature", "decimal_below_min_value"),
    (chat(temperature=2.0001), "temperature", "decimal_above_max_value"),
    (chat(temperature=3), "temperature", "decimal_above_max_value"),
    (chat(top_p=1.5), "top_p", "decimal_above_max_value"),
    (chat(top_p=-1), "top_p", "decimal_below_min_value"),
    (chat(top_p=True), "top_p", "invalid_type"),
    (chat(top_p="0.5"), "top_p", "invalid_type"),
    (chat(presence_penalty=2.5), "presence_penalty", "decimal_above_max_value"),
    (chat(frequency_penalty=-2.5), "frequency_penalty", "decimal_below_min_value"),
    (chat(frequency_penalty="0"), "frequency_penalty", "invalid_type"),
    # integers
    (chat(max_tokens=0), "max_tokens", "integer_below_min_value"),
    (chat(max_tokens=-5), "max_tokens", "integer_below_min_value"),
    (chat(max_tokens=1.5), "max_tokens", "invalid_type"),
    (chat(max_tokens="10"), "max_tokens", "invalid_type"),
    (chat(max_tokens=True), "max_tokens", "invalid_type"),
    (chat(max_tokens=2**31), "max_tokens", "integer_above_max_value"),
    (chat(max_completion_tokens=0), "max_completion_tokens", "integer_below_min_value"),
    (chat(max_completion_tokens="5"), "max_completion_tokens", "invalid_type"),
    (chat(max_completion_tokens=5, max_tokens=0), "max_tokens", "integer_below_min_value"),
    (chat(n=0), "n", "integer_below_min_value"),
    (chat(n=-1), "n", "integer_below_min_value"),
    (chat(n=129), "n", "integer_above_max_value"),
    (chat(n=True), "n", "invalid_type"),
    (chat(n="2"), "n", "invalid_type"),
    (chat(n=1.5), "n", "invalid_type"),
    (chat(seed="1"), "seed", "invalid_type"),
    (chat(seed=1.5), "seed", "invalid_type"),
    (chat(seed=True), "seed", "invalid_type"),
    (chat(seed=2**63), "seed", "integer_above_max_value"),
    (chat(seed=-(2**63) - 1), "seed", "integer_below_min_value"),
    (chat(top_logprobs=21), "top_logprobs", "integer_above_max_value"),
    (chat(top_logprobs=-1), "top_logprobs", "integer_below_min_value"),
    # booleans
    (chat(stream="true"), "stream", "invalid_type"),
    (chat(stream=1), "stream", "invalid_type"),
    (chat(stream=0), "stream", "invalid_type"),
    (chat(logprobs=1), "logprobs", "invalid_type"),
    # stop
    (chat(stop=1), "stop", "invalid_type"),
    (chat(stop={"a": 1}), "stop", "invalid_type"),
    (chat(stop=True), "stop", "invalid_type"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length"),
    (chat(stop=["a", 1]), "stop[1]", "invalid_type"),
    (chat(stop=[None]), "stop[0]", "invalid_type"),
    # stream_options
    (chat(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (chat(stream=False, stream_options={}), "stream_options", "invalid_value"),
    (chat(stream=True, stream_options=True), "stream_options", "invalid_type"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage", "invalid_type"),
    # misc objects
    (chat(user=5), "user", "invalid_type"),
    (chat(tools={}), "tools", "invalid_type"),
    (chat(tool_choice=5), "tool_choice", "invalid_type"),
    (chat(response_format="json"), "response_format", "invalid_type"),
    (chat(response_format={}), "response_format.type", "missing_required_parameter"),
    (chat(response_format={"type": "xml"}), "response_format.type", "invalid_value"),
    (chat(logit_bias=[1]), "logit_bias", "invalid_type"),
]


@pytest.mark.parametrize("body, param, code", CHAT_ERRORS)
def test_chat_errors(body, param, code):
    e = err("chat", body)
    assert (e.status, e.type, e.param, e.code) == (400, "invalid_request_error", param, code), e.message


COMPLETION_ERRORS = [
    (b'{"model":"m"}', "prompt", "missing_required_parameter", 400),
    (comp(prompt=None), "prompt", "missing_required_parameter", 400),
    (comp(prompt=5), "prompt", "invalid_type", 400),
    (comp(prompt={"a": 1}), "prompt", "invalid_type", 400),
    (comp(prompt=[]), "prompt", "empty_array", 400),
    (comp(prompt=["a", 1]), "prompt", "invalid_type", 400),
    (comp(prompt=[None]), "prompt", "invalid_type", 400),
    (comp(prompt=["a", "b"]), "prompt", "unsupported_parameter", 400),
    (comp(prompt=[1, 2, 3]), "prompt", "unsupported_parameter", 400),
    (comp(prompt=[[1, 2], [3]]), "prompt", "unsupported_parameter", 400),
    (comp(model=None), "model", "missing_required_parameter", 400),
    (comp(max_tokens=0), "max_tokens", "integer_below_min_value", 400),
    (comp(logprobs=True), "logprobs", "invalid_type", 400),
    (comp(logprobs=6), "logprobs", "integer_above_max_value", 400),
    (comp(best_of=0), "best_of", "integer_below_min_value", 400),
    (comp(echo="yes"), "echo", "invalid_type", 400),
    (comp(suffix=1), "suffix", "invalid_type", 400),
    (comp(temperature=True), "temperature", "invalid_type", 400),
    (comp(stop=["1", "2", "3", "4", "5"]), "stop", "array_above_max_length", 400),
]


@pytest.mark.parametrize("body, param, code, status", COMPLETION_ERRORS)
def test_completion_errors(body, param, code, status):
    e = err("completions", body)
    assert (e.status, e.param, e.code) == (status, param, code), e.message


def test_error_messages_are_openai_like():
    assert err("chat", chat(temperature=3)).message == (
        "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead.")
    assert err("chat", chat(max_tokens=0)).message == (
        "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.")
    assert err("chat", chat(temperature=True)).message == (
        "Invalid type for 'temperature': expected a decimal, but got a boolean instead.")
    assert err("chat", chat(messages="x")).message == (
        "Invalid type for 'messages': expected an array, but got a string instead.")
    assert err("chat", b'{"model":"m"}').message == "Missing required parameter: 'messages'."
    assert err("chat", chat(messages=[{"role": "robot", "content": "x"}])).message.startswith(
        "Invalid value: 'robot'. Supported values are: 'system'")
    assert "length 5" in err("chat", chat(stop=list("abcde"))).message
    assert "only one prompt" in err("completions", comp(prompt=["a", "b"])).message
    assert "token arrays" in err("completions", comp(prompt=[1, 2])).message


def test_extra_fields_not_rejected():
    r = parse_request("chat", chat(foo=1, metadata={"a": "b"}, store=True, reasoning_effort="low"))
    assert r.raw["foo"] == 1 and r.raw["reasoning_effort"] == "low"


def test_image_parts_parse_but_text_only_counts():
    r = parse_request(
        "chat",
        chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:"}}, {"type": "text", "text": "what?"}]}]),
    )
    assert r.messages[0].text == "what?"


# --------------------------------------------------------------------------- ChatMessage / request_to_body


def test_chat_message_text_and_to_dict():
    assert ChatMessage("user", None).text == ""
    assert ChatMessage("user", [{"type": "text", "text": "a"}, {"type": "image_url"}, "junk", {"type": "text", "text": "b"}]).text == "ab"
    m = ChatMessage("assistant", None, name="n", tool_calls=[{}], tool_call_id="t", extra={"refusal": None, "role": "x"})
    assert m.to_dict() == {"role": "assistant", "content": None, "name": "n", "tool_calls": [{}], "tool_call_id": "t", "refusal": None}
    assert ChatMessage("user", "x").to_dict() == {"role": "user", "content": "x"}


def test_request_to_body_roundtrip_unchanged():
    body = chat(temperature=0.5, stop="x", extra_thing=[1, 2], messages=[{"role": "user", "content": "hi", "refusal": None}])
    r = parse_request("chat", body)
    out = json.loads(request_to_body(r))
    expected = json.loads(body)
    expected["stop"] = ["x"]
    assert out == expected


def test_request_to_body_writes_rewritten_fields():
    r = parse_request("chat", chat(max_completion_tokens=100, max_tokens=50, n=1, stream=True,
                                   stream_options={"include_usage": False}, seed=3))
    r.model = "backend-model"
    r.max_tokens = 10
    r.messages.insert(0, ChatMessage("system", "be brief"))
    r.temperature = 0.2
    r.stop = []
    r.seed = None
    r.stream = False
    out = json.loads(request_to_body(r))
    assert out["model"] == "backend-model"
    assert out["max_completion_tokens"] == 10 and "max_tokens" not in out
    assert out["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert out["temperature"] == 0.2
    assert "stop" not in out and "seed" not in out
    assert "stream" in out and out["stream"] is False and "stream_options" not in out
    assert out["n"] == 1  # the client sent it: kept


def test_request_to_body_defaults_not_added():
    r = parse_request("chat", chat())
    r.max_tokens = 5
    out = json.loads(request_to_body(r))
    assert out == {"model": "m", "messages": USER, "max_tokens": 5}
    r.stream = True
    r.stream_options = {"include_usage": True}
    out = json.loads(request_to_body(r))
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}


def test_request_to_body_completions():
    r = parse_request("completions", comp(prompt=["p"], echo=False, best_of=1, x=1))
    r.max_tokens = 9
    out = json.loads(request_to_body(r))
    assert out == {"model": "m", "prompt": "p", "echo": False, "best_of": 1, "x": 1, "max_tokens": 9}


def test_request_to_body_non_ascii_and_a_surrogate_pair():
    r = parse_request("chat", b'{"model":"m","messages":[{"role":"user","content":"\\ud83d\\ude00 caf\\u00e9"}]}')
    out = request_to_body(r)
    out.decode("utf-8")
    assert json.loads(out)["messages"][0]["content"] == "\U0001f600 café"


@pytest.mark.parametrize("body, param", [
    (b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}', "messages[0].content"),
    (b'{"model":"m","messages":[{"role":"user","content":"a \\uDFFF b"}]}', "messages[0].content"),
    (b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{"\\ud800":"k"}}', "metadata"),
    (b'{"model":"\\udc00","messages":[{"role":"user","content":"hi"}]}', "model"),
])
def test_a_lone_surrogate_anywhere_is_400_naming_the_field(body, param):
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", body)
    assert err.value.status == 400 and err.value.code == "invalid_unicode"
    assert err.value.param == param and err.value.type == "invalid_request_error"


def test_a_lone_surrogate_in_a_completions_prompt_is_400():
    with pytest.raises(OpenAIError) as err:
        parse_request("completions", b'{"model":"m","prompt":"x\\ud801"}')
    assert err.value.status == 400 and err.value.param == "prompt"


def test_an_escaped_backslash_before_u_d800_is_text_not_a_surrogate():
    r = parse_request("chat", b'{"model":"m","messages":[{"role":"user","content":"\\\\ud800"}]}')
    assert r.messages[0].content == "\\ud800"


@pytest.mark.parametrize("number", [b"1e999", b"-1e400"])
def test_a_number_too_large_for_a_double_is_400_not_infinity(number):
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x":' + number + b"}")
    assert err.value.status == 400


# --------------------------------------------------------------------------- responses


def test_usage():
    u = Usage(3, 4)
    assert u.total_tokens == 7
    assert u.to_dict() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_chat_completion_shape():
    d = chat_completion(id="chatcmpl-1", model="m", created=1, text="hi", finish_reason="stop", usage=Usage(1, 2))
    c = ChatCompletion.model_validate(d)
    assert c.choices[0].message.content == "hi" and c.choices[0].message.role == "assistant"
    assert c.usage.total_tokens == 3 and c.object == "chat.completion"


def test_text_completion_shape():
    d = text_completion(id="cmpl-1", model="m", created=1, text="hi", finish_reason="length", usage=Usage(1, 2))
    c = Completion.model_validate(d)
    assert c.choices[0].text == "hi" and c.choices[0].finish_reason == "length" and c.usage.total_tokens == 3


def test_chunk_builders():
    from openai.types.chat import ChatCompletionChunk

    c = ChatCompletionChunk.model_validate(chat_chunk(id="x", model="m", created=1, delta={"content": "a"}))
    assert c.choices[0].delta.content == "a" and c.usage is None
    c = ChatCompletionChunk.model_validate(
        chat_chunk(id="x", model="m", created=1, delta={}, finish_reason="stop", usage=Usage(1, 1)))
    assert c.usage.total_tokens == 2
    c = ChatCompletionChunk.model_validate(usage_chunk(endpoint="chat", id="x", model="m", created=1, usage=Usage(1, 1)))
    assert c.choices == []
    t = text_chunk(id="x", model="m", created=1, text="a", finish_reason="stop", usage=Usage(1, 1))
    assert Completion.model_validate(t).usage.total_tokens == 2
    u = usage_chunk(endpoint="completions", id="x", model="m", created=1, usage=Usage(1, 1))
    assert u["object"] == "text_completion" and u["choices"] == []


@pytest.mark.parametrize(
    "obj, expected",
    [
        ({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}, Usage(3, 4)),
        ({"usage": {"prompt_tokens": 3}}, Usage(3, 0)),
        ({"usage": None}, None),
        ({}, None),
        ({"usage": "x"}, None),
        ({"usage": {"prompt_tokens": "3", "completion_tokens": 1}}, None),
        ({"usage": {"prompt_tokens": -1, "completion_tokens": 1}}, None),
        ({"usage": {"prompt_tokens": 1, "completion_tokens": True}}, None),
        ([], None),
    ],
)
def test_usage_from_openai(obj, expected):
    assert usage_from_openai(obj) == expected


def test_new_completion_id():
    a, b = new_completion_id("chat"), new_completion_id("chat")
    assert a.startswith("chatcmpl-") and a != b and len(a) == len("chatcmpl-") + 24
    assert new_completion_id("completions").startswith("cmpl-")


@pytest.mark.parametrize(
    "obj",
    [
        {"a": [1, 2.5, -0.0, 1e300, None, True, False, "é🙂\n\"\\\x00"], "b": {"c": {}}, "d": []},
        "plain", "é", 1, 2.5, None, True, [], {}, {"k": "\ud800"},
        {1: "int key"},
    ],
)
def test_dumps_matches_stdlib(obj):
    assert dumps(obj) == json.dumps(obj, separators=(",", ":")).encode()
    dumps(obj).decode("ascii")


def test_dumps_rejects_unserialisable():
    with pytest.raises(TypeError):
        dumps({"a": object()})
