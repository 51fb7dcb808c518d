"""OpenAI API wire format: request parsing/validation, errors, and response builders.

Pure functions, no I/O.  `parse_request` is on the hot path of every request, so it
validates with hand-written checks over the stdlib `json` result instead of a pydantic
model: ~4 us for a typical chat body (of which ~2.3 us is JSON decoding) against ~7 us for
json.loads + an equivalent pydantic model + building the request, and the error messages
(param, code, wording) match OpenAI's own.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "OpenAIError",
    "invalid_request",
    "unsupported_parameter",
    "model_not_found",
    "request_too_large",
    "upstream_error",
    "internal_error",
    "not_found_path",
    "method_not_allowed",
    "ChatMessage",
    "OpenAIRequest",
    "Usage",
    "parse_request",
    "request_to_body",
    "chat_completion",
    "text_completion",
    "chat_chunk",
    "text_chunk",
    "usage_chunk",
    "usage_from_openai",
    "new_completion_id",
    "dumps",
]

Endpoint = Literal["chat", "completions"]


def _make_encoder():
    """A str-returning compact JSON encoder (ASCII output: always valid UTF-8, even for lone
    surrogates a client sent as \\ud800 escapes). Uses a prebuilt C encoder when the running
    Python has the usual one (2-3x cheaper per call than JSONEncoder.encode, which builds a
    new C encoder every time); falls back to JSONEncoder otherwise."""
    fallback = json.JSONEncoder(separators=(",", ":")).encode
    try:
        from json.encoder import c_make_encoder, encode_basestring_ascii

        def default(o: Any) -> Any:
            raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

        c = c_make_encoder(None, default, encode_basestring_ascii, None, ":", ",", False, False, True)

        def encode(obj: Any) -> str:
            if type(obj) is str:
                return encode_basestring_ascii(obj)
            return "".join(c(obj, 0))

        sample = {"a": [1, 2.5, None, True, "\u00e9\n"], "b": {"c": -1}}
        if encode(sample) != fallback(sample):  # pragma: no cover - a Python with another signature
            return fallback
        return encode
    except Exception:  # pragma: no cover - no C accelerator
        return fallback


_encode = _make_encoder()


def dumps(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes (the serialisation used for every body we emit)."""
    return _encode(obj).encode()


# --------------------------------------------------------------------------- errors


class OpenAIError(Exception):
    """An error the gateway answers with, in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        """`{"error": {"message", "type", "param", "code"}}` as OpenAI sends it."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        """The error body as compact JSON bytes."""
        return dumps(self.to_dict())

    def __repr__(self) -> str:
        return (
            f"OpenAIError(status={self.status}, message={self.message!r}, type={self.type!r}, "
            f"param={self.param!r}, code={self.code!r})"
        )


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> OpenAIError:
    """400 invalid_request_error."""
    return OpenAIError(400, message, param=param, code=code)


def unsupported_parameter(param: str, reason: str) -> OpenAIError:
    """400: a parameter this gateway/backend cannot honour; `reason` says why."""
    return OpenAIError(
        400, f"Unsupported parameter: '{param}': {reason}", param=param, code="unsupported_parameter"
    )


def model_not_found(model: str) -> OpenAIError:
    """404 for a model the gateway does not serve (OpenAI's wording)."""
    return OpenAIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def request_too_large(size: int, limit: int) -> OpenAIError:
    """413 for a request body over the configured limit."""
    return OpenAIError(
        413,
        f"Request body too large: {size} bytes exceeds the limit of {limit} bytes.",
        code="request_too_large",
    )


def upstream_error(status: int, message: str) -> OpenAIError:
    """Map a failure of the upstream model server to the status the client gets.

    `status` is the upstream HTTP status (0 or negative: no response at all, e.g. connection
    refused). 400/422 -> 400 (the upstream rejected the request, e.g. prompt too long);
    408/504 -> 504 timeout; 429/503/no response -> 503 unavailable; anything else
    (5xx, 401/403/404/...) -> 502 bad gateway.
    """
    if status in (400, 422):
        return OpenAIError(
            400, f"The model server rejected the request: {message}", code="upstream_bad_request"
        )
    if status in (408, 504):
        return OpenAIError(
            504,
            f"The model server timed out: {message}",
            type="server_error",
            code="upstream_timeout",
        )
    if status <= 0 or status in (429, 503):
        return OpenAIError(
            503,
            f"The model server is unavailable or overloaded, please retry: {message}",
            type="server_error",
            code="upstream_unavailable",
        )
    return OpenAIError(
        502,
        f"The model server failed (HTTP {status}): {message}",
        type="server_error",
        code="upstream_error",
    )


def internal_error(message: str, *, code: str = "internal_error") -> OpenAIError:
    """500 server_error."""
    return OpenAIError(500, message, type="server_error", code=code)


def not_found_path(path: str, *, method: str | None = None) -> OpenAIError:
    """404 for an unknown endpoint: `Invalid URL (POST /v1/foo)` like OpenAI."""
    where = f"{method} {path}" if method else path
    return OpenAIError(404, f"Invalid URL ({where})", code="unknown_url")


def method_not_allowed(method: str, *, path: str | None = None) -> OpenAIError:
    """405 for a known endpoint called with the wrong HTTP method."""
    where = f" for {path}" if path else " for this endpoint"
    return OpenAIError(405, f"Method {method} is not allowed{where}.", code="method_not_allowed")


# --------------------------------------------------------------------------- data


@dataclass(slots=True)
class ChatMessage:
    """One chat message. `extra` keeps any other keys the client sent (for passthrough)."""

    role: str
    content: str | list | None
    name: str | None = None
    tool_calls: list | None = None
    tool_call_id: str | None = None
    extra: dict | None = None

    @property
    def text(self) -> str:
        """The content as plain text: the string, or the concatenated `text` parts."""
        c = self.content
        if c is None:
            return ""
        if type(c) is str:
            return c
        return "".join(
            p["text"] for p in c if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )

    def to_dict(self) -> dict:
        """The message as OpenAI JSON (keys that are None are left out, except content)."""
        d: dict = {"role": self.role, "content": self.content}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls is not None:
            d["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.extra:
            for k, v in self.extra.items():
                d.setdefault(k, v)
        return d


@dataclass(slots=True)
class Usage:
    """Token usage of one completion."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(slots=True, kw_only=True)
class OpenAIRequest:
    """A validated /v1/chat/completions or /v1/completions request (built by keyword: 25 fields)."""

    endpoint: Endpoint
    model: str
    messages: list[ChatMessage] | None  # chat
    prompt: str | None  # completions
    stream: bool
    max_tokens: int | None  # chat: max_completion_tokens wins over max_tokens
    temperature: float | None
    top_p: float | None
    stop: list[str]
    seed: int | None
    n: int
    stream_options: dict | None
    user: str | None
    raw: dict  # the parsed body as received
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None  # chat: bool; completions: int 0..5
    top_logprobs: int | None = None  # chat only
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    logit_bias: dict | None = None
    best_of: int | None = None  # completions only
    echo: bool = False  # completions only
    suffix: str | None = None  # completions only

    @property
    def include_usage(self) -> bool:
        """True when the client asked for the extra usage chunk (stream_options.include_usage)."""
        so = self.stream_options
        return bool(so and so.get("include_usage") is True)


# --------------------------------------------------------------------------- validation helpers

_INVALID_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please contact "
    "the gateway's operators.)"
)

_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_ROLES_MSG = "'system', 'developer', 'user', 'assistant', 'tool', and 'function'"
_PART_TYPES = ("text", "image_url", "input_audio", "refusal", "file", "audio")
_PART_TYPES_MSG = "'text', 'image_url', 'input_audio', 'refusal', 'file', and 'audio'"
_MSG_KEYS = frozenset(("role", "content", "name", "tool_calls", "tool_call_id"))
_INT32_MAX = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _reject_constant(name: str):
    raise ValueError(f"invalid JSON constant {name}")


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a double (1e999) is refused, not made inf
    (inf is not JSON: passed through to an upstream it would become ``Infinity``)."""
    f = float(text)
    if f - f != 0.0:  # inf (nan cannot come from a JSON number)
        raise ValueError(f"number out of range: {text[:40]}")
    return f


_decode = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float).decode

#: A ``\\uD800``..``\\uDFFF`` escape: the only way a surrogate gets into the decoded body (UTF-8
#: cannot carry one: str(body, "utf-8") refuses it), so bodies without one skip the walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _lone_surrogate_at(obj: Any, path: str = "") -> str | None:
    """Where in the decoded JSON a string (or key) holds a surrogate code point, which is no
    Unicode scalar value: its param path, or None. A valid pair (\\ud83d\\ude00) was joined
    into one code point by the decoder, so whatever is left is unpaired."""
    stack = [(obj, path)]
    while stack:
        v, where = stack.pop()
        t = type(v)
        if t is str:
            if _SURROGATES.search(v):
                return where or "body"
        elif t is dict:
            for k, item in v.items():
                key = f"{where}.{k}" if where else k
                if _SURROGATES.search(k):
                    return where or "body"
                stack.append((item, key))
        elif t is list:
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(v))
    return None


def _kind(v: Any) -> str:
    t = type(v)
    if v is None:
        return "null"
    if t is bool:
        return "a boolean"
    if t is int:
        return "an integer"
    if t is float:
        return "a decimal"
    if t is str:
        return "a string"
    if t is list:
        return "an array"
    if t is dict:
        return "an object"
    return t.__name__  # pragma: no cover - json.loads makes nothing else


def _bad_type(param: str, expected: str, v: Any) -> OpenAIError:
    return invalid_request(
        f"Invalid type for '{param}': expected {expected}, but got {_kind(v)} instead.",
        param=param,
        code="invalid_type",
    )


def _missing(param: str) -> OpenAIError:
    return invalid_request(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def _invalid_value(param: str, v: Any, allowed_msg: str) -> OpenAIError:
    return invalid_request(
        f"Invalid value: '{v}'. Supported values are: {allowed_msg}.", param=param, code="invalid_value"
    )


# The value checkers below take the value (never None: callers skip absent/null keys
# themselves, which keeps the common case of an absent field to one dict lookup).


def _number(key: str, v: Any, lo: float, hi: float) -> float:
    t = type(v)
    if t is not float and t is not int:  # bool is excluded: type(True) is bool
        raise _bad_type(key, "a decimal", v)
    if v < lo:
        raise invalid_request(
            f"Invalid '{key}': decimal below minimum value. Expected a value >= {lo:g}, but got {v} instead.",
            param=key,
            code="decimal_below_min_value",
        )
    if v > hi:
        raise invalid_request(
            f"Invalid '{key}': decimal above maximum value. Expected a value <= {hi:g}, but got {v} instead.",
            param=key,
            code="decimal_above_max_value",
        )
    return float(v)


def _integer(key: str, v: Any, lo: int, hi: int) -> int:
    t = type(v)
    if t is not int:
        if t is float and v.is_integer():
            v = int(v)
        else:
            raise _bad_type(key, "an integer", v)
    if v < lo:
        raise invalid_request(
            f"Invalid '{key}': integer below minimum value. Expected a value >= {lo}, but got {v} instead.",
            param=key,
            code="integer_below_min_value",
        )
    if v > hi:
        raise invalid_request(
            f"Invalid '{key}': integer above maximum value. Expected a value <= {hi}, but got {v} instead.",
            param=key,
            code="integer_above_max_value",
        )
    return v


def _boolean(key: str, v: Any) -> bool:
    if v is True or v is False:
        return v
    raise _bad_type(key, "a boolean", v)


def _string(key: str, v: Any) -> str:
    if type(v) is str:
        return v
    raise _bad_type(key, "a string", v)


def _object(key: str, v: Any) -> dict:
    if type(v) is dict:
        return v
    raise _bad_type(key, "an object", v)


def _array(key: str, v: Any) -> list:
    if type(v) is list:
        return v
    raise _bad_type(key, "an array", v)


def _stop(v: Any) -> list[str]:
    if type(v) is str:
        return [v]
    if type(v) is not list:
        raise _bad_type("stop", "one of a string or array of strings", v)
    if len(v) > 4:
        raise invalid_request(
            "Invalid 'stop': array too long. Expected an array with maximum length 4, "
            f"but got an array with length {len(v)} instead.",
            param="stop",
            code="array_above_max_length",
        )
    for i, s in enumerate(v):
        if type(s) is not str:
            raise _bad_type(f"stop[{i}]", "a string", s)
    return list(v)


def _content(m: dict, i: int, role: str) -> str | list | None:
    if "content" not in m:
        if role == "assistant" or role == "function":
            return None
        raise _missing(f"messages[{i}].content")
    c = m["content"]
    t = type(c)
    if t is str:
        return c
    if c is None:
        if role == "assistant" or role == "function":
            return None
        raise _bad_type(f"messages[{i}].content", "one of a string or array of objects", c)
    if t is not list:
        raise _bad_type(f"messages[{i}].content", "one of a string or array of objects", c)
    if not c:
        raise invalid_request(
            f"Invalid 'messages[{i}].content': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param=f"messages[{i}].content",
            code="empty_array",
        )
    for j, part in enumerate(c):
        if type(part) is not dict:
            raise _bad_type(f"messages[{i}].content[{j}]", "an object", part)
        pt = part.get("type")
        if pt is None:
            raise _missing(f"messages[{i}].content[{j}].type")
        if type(pt) is not str:
            raise _bad_type(f"messages[{i}].content[{j}].type", "a string", pt)
        if pt not in _PART_TYPES:
            raise _invalid_value(f"messages[{i}].content[{j}].type", pt, _PART_TYPES_MSG)
        if pt == "text":
            tx = part.get("text")
            if tx is None:
                raise _missing(f"messages[{i}].content[{j}].text")
            if type(tx) is not str:
                raise _bad_type(f"messages[{i}].content[{j}].text", "a string", tx)
    return c


def _messages(body: dict) -> list[ChatMessage]:
    msgs = body.get("messages")
    if msgs is None:
        raise _missing("messages")
    if type(msgs) is not list:
        raise _bad_type("messages", "an array", msgs)
    if not msgs:
        raise invalid_request(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    out: list[ChatMessage] = []
    append = out.append
    for i, m in enumerate(msgs):
        if type(m) is not dict:
            raise _bad_type(f"messages[{i}]", "an object", m)
        role = m.get("role")
        if role is None:
            raise _missing(f"messages[{i}].role")
        if type(role) is not str:
            raise _bad_type(f"messages[{i}].role", "a string", role)
        if role not in _ROLES:
            raise _invalid_value(f"messages[{i}].role", role, _ROLES_MSG)
        content = _content(m, i, role)
        name = m.get("name")
        if name is not None and type(name) is not str:
            raise _bad_type(f"messages[{i}].name", "a string", name)
        tool_calls = m.get("tool_calls")
        if tool_calls is not None and type(tool_calls) is not list:
            raise _bad_type(f"messages[{i}].tool_calls", "an array", tool_calls)
        tool_call_id = m.get("tool_call_id")
        if tool_call_id is not None and type(tool_call_id) is not str:
            raise _bad_type(f"messages[{i}].tool_call_id", "a string", tool_call_id)
        if role == "tool" and tool_call_id is None:
            raise _missing(f"messages[{i}].tool_call_id")
        if role == "function" and name is None:
            raise _missing(f"messages[{i}].name")
        extra = None
        if len(m) > 2:
            for k in m:
                if k not in _MSG_KEYS:
                    if extra is None:
                        extra = {}
                    extra[k] = m[k]
        append(ChatMessage(role, content, name, tool_calls, tool_call_id, extra))
    return out


def _prompt(body: dict) -> str:
    p = body.get("prompt")
    if p is None:
        raise _missing("prompt")
    if type(p) is str:
        return p
    if type(p) is not list:
        raise _bad_type(
            "prompt",
            "one of a string, array of strings, array of integers, or array of arrays of integers",
            p,
        )
    if not p:
        raise invalid_request(
            "Invalid 'prompt': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="prompt",
            code="empty_array",
        )
    first = p[0]
    if type(first) is str:
        if len(p) == 1:
            return first
        if all(type(x) is str for x in p):
            raise unsupported_parameter(
                "prompt", "only one prompt per request is supported; send one request per prompt."
            )
    elif type(first) is int or type(first) is list:
        raise unsupported_parameter(
            "prompt", "token arrays are not supported; send the prompt as a string."
        )
    raise _bad_type(
        "prompt",
        "one of a string, array of strings, array of integers, or array of arrays of integers",
        p,
    )


# --------------------------------------------------------------------------- parse


def parse_request(endpoint: Endpoint, body: bytes) -> OpenAIRequest:
    """Parse and validate an OpenAI request body; raise OpenAIError (400) like OpenAI would.

    The body must be UTF-8 JSON (NaN/Infinity are not JSON and are rejected). Unknown
    fields are not rejected: they stay in `raw` for passthrough upstreams.
    """
    try:
        d = _decode(body if type(body) is str else str(body, "utf-8"))
    except (ValueError, RecursionError, TypeError):
        raise invalid_request(_INVALID_JSON) from None
    if _SURROGATE_ESCAPE.search(body if type(body) is not str else body.encode("utf-8", "surrogatepass")):
        where = _lone_surrogate_at(d)
        if where is not None:
            raise invalid_request(
                f"Invalid value for '{where}': the string holds a lone UTF-16 surrogate (an unpaired "
                "\\uD800-\\uDFFF escape), which is not valid Unicode.",
                param=None if where == "body" else where,
                code="invalid_unicode",
            )
    if type(d) is not dict:
        raise invalid_request(
            f"Invalid type for the request body: expected an object, but got {_kind(d)} instead.",
            code="invalid_type",
        )
    get = d.get

    model = get("model")
    if model is None or model == "":
        raise invalid_request("You must provide a model parameter.", param="model", code="missing_required_parameter")
    if type(model) is not str:
        raise _bad_type("model", "a string", model)

    best_of = suffix = top_logprobs = None
    echo = False
    if endpoint == "chat":
        messages = _messages(d)
        prompt = None
        v = get("max_completion_tokens")
        max_tokens = None if v is None else _integer("max_completion_tokens", v, 1, _INT32_MAX)
        v = get("max_tokens")
        if v is not None:
            v = _integer("max_tokens", v, 1, _INT32_MAX)
            if max_tokens is None:
                max_tokens = v
        v = get("logprobs")
        logprobs: bool | int | None = None if v is None else _boolean("logprobs", v)
        v = get("top_logprobs")
        top_logprobs = None if v is None else _integer("top_logprobs", v, 0, 20)
    elif endpoint == "completions":
        messages = None
        prompt = _prompt(d)
        v = get("max_tokens")
        max_tokens = None if v is None else _integer("max_tokens", v, 1, _INT32_MAX)
        v = get("logprobs")
        logprobs = None if v is None else _integer("logprobs", v, 0, 5)
        v = get("best_of")
        best_of = None if v is None else _integer("best_of", v, 1, 20)
        v = get("echo")
        echo = False if v is None else _boolean("echo", v)
        v = get("suffix")
        suffix = None if v is None else _string("suffix", v)
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}")

    v = get("stream")
    stream = False if v is None else _boolean("stream", v)
    stream_options = get("stream_options")
    if stream_options is not None:
        _object("stream_options", stream_options)
        if not stream:
            raise invalid_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
                code="invalid_value",
            )
        iu = stream_options.get("include_usage")
        if iu is not None and type(iu) is not bool:
            raise _bad_type("stream_options.include_usage", "a boolean", iu)

    v = get("temperature")
    temperature = None if v is None else _number("temperature", v, 0.0, 2.0)
    v = get("top_p")
    top_p = None if v is None else _number("top_p", v, 0.0, 1.0)
    v = get("stop")
    stop = [] if v is None else _stop(v)
    v = get("seed")
    seed = None if v is None else _integer("seed", v, _INT64_MIN, _INT64_MAX)
    v = get("n")
    n = 1 if v is None else _integer("n", v, 1, 128)
    user = get("user")
    if user is not None:
        _string("user", user)
    v = get("presence_penalty")
    presence_penalty = None if v is None else _number("presence_penalty", v, -2.0, 2.0)
    v = get("frequency_penalty")
    frequency_penalty = None if v is None else _number("frequency_penalty", v, -2.0, 2.0)
    tools = get("tools")
    if tools is not None:
        _array("tools", tools)
    tool_choice = get("tool_choice")
    if tool_choice is not None and type(tool_choice) is not str and type(tool_choice) is not dict:
        raise _bad_type("tool_choice", "one of a string or an object", tool_choice)
    response_format = get("response_format")
    if response_format is not None:
        _object("response_format", response_format)
        rtype = response_format.get("type")
        if rtype is None:
            raise _missing("response_format.type")
        if rtype not in ("text", "json_object", "json_schema"):
            raise _invalid_value("response_format.type", rtype, "'text', 'json_object', and 'json_schema'")
    logit_bias = get("logit_bias")
    if logit_bias is not None:
        _object("logit_bias", logit_bias)

    return OpenAIRequest(
        endpoint=endpoint, model=model, messages=messages, prompt=prompt, stream=stream,
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, n=n,
        stream_options=stream_options, user=user, raw=d, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, logprobs=logprobs, top_logprobs=top_logprobs, tools=tools,
        tool_choice=tool_choice, response_format=response_format, logit_bias=logit_bias, best_of=best_of,
        echo=echo, suffix=suffix,
    )


def request_to_body(req: OpenAIRequest) -> bytes:
    """Serialise `req.raw` with the typed fields of `req` written over it (for passthrough).

    Every typed field is written back, so a plugin that rewrote e.g. `req.model` or
    `req.max_tokens` is honoured; a field set to None (or to its default when the client
    had not sent it) is removed. For chat, `max_tokens` goes out under the name the client
    used (`max_completion_tokens` if it sent that, else `max_tokens`). `stream_options` is
    dropped when not streaming. Unknown fields pass through untouched.
    """
    d = dict(req.raw)

    def put(key: str, value: Any, default: Any = None) -> None:
        if value is None or (value == default and key not in d):
            d.pop(key, None)
        else:
            d[key] = value

    d["model"] = req.model
    if req.endpoint == "chat":
        d["messages"] = [m.to_dict() for m in (req.messages or ())]
        d.pop("prompt", None)
        if "max_completion_tokens" in d:
            d.pop("max_tokens", None)
            put("max_completion_tokens", req.max_tokens)
        else:
            put("max_tokens", req.max_tokens)
        put("top_logprobs", req.top_logprobs)
    else:
        d["prompt"] = req.prompt if req.prompt is not None else ""
        d.pop("messages", None)
        put("max_tokens", req.max_tokens)
        put("best_of", req.best_of)
        put("echo", req.echo, False)
        put("suffix", req.suffix)
    put("stream", req.stream, False)
    put("stream_options", req.stream_options if req.stream else None)
    put("temperature", req.temperature)
    put("top_p", req.top_p)
    put("stop", req.stop or None)
    put("seed", req.seed)
    put("n", req.n, 1)
    put("user", req.user)
    put("presence_penalty", req.presence_penalty)
    put("frequency_penalty", req.frequency_penalty)
    put("logprobs", req.logprobs)
    put("tools", req.tools)
    put("tool_choice", req.tool_choice)
    put("response_format", req.response_format)
    put("logit_bias", req.logit_bias)
    return dumps(d)


# --------------------------------------------------------------------------- responses


def new_completion_id(endpoint: Endpoint) -> str:
    """A fresh id: `chatcmpl-<24 hex>` for chat, `cmpl-<24 hex>` for completions."""
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + os.urandom(12).hex()


def chat_completion(*, id: str, model: str, created: int, text: str, finish_reason: str, usage: Usage) -> dict:
    """A non-streamed `chat.completion` object with one choice."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage.to_dict(),
    }


def text_completion(*, id: str, model: str, created: int, text: str, finish_reason: str, usage: Usage) -> dict:
    """A non-streamed `text_completion` object with one choice."""
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage.to_dict(),
    }


def chat_chunk(
    *,
    id: str,
    model: str,
    created: int,
    delta: dict,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict:
    """One `chat.completion.chunk` with one choice (usage added when given)."""
    d = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        d["usage"] = usage.to_dict()
    return d


def text_chunk(
    *,
    id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict:
    """One streamed `text_completion` chunk with one choice (usage added when given)."""
    d = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        d["usage"] = usage.to_dict()
    return d


def usage_chunk(*, endpoint: Endpoint, id: str, model: str, created: int, usage: Usage) -> dict:
    """The extra final chunk OpenAI sends with `stream_options.include_usage`: no choices, usage."""
    return {
        "id": id,
        "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage.to_dict(),
    }


def usage_from_openai(obj: dict) -> Usage | None:
    """Read `usage` from an OpenAI response or chunk; None when absent, null or malformed."""
    if type(obj) is not dict:
        return None
    u = obj.get("usage")
    if type(u) is not dict:
        return None
    p = u.get("prompt_tokens")
    c = u.get("completion_tokens")
    if type(p) is not int or p < 0:
        return None
    if c is None:
        c = 0
    elif type(c) is not int or c < 0:
        return None
    return Usage(p, c)
