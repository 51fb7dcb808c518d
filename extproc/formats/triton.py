"""OpenAI <-> Triton generate extension (`/v2/models/<model>/generate[_stream]`).

Tensor contract shared by the CPU reference tiers and the TensorRT-LLM ensemble:

request   {"text_input", "max_tokens", "stream", "temperature"?, "top_p"?, "random_seed"?,
           "stop_words"?}
response  {"model_name", "model_version", "text_output", "prompt_tokens",
           "completion_tokens", "finish_reason": "stop"|"length"}
streamed  SSE `data: {... "text_output": <delta>, "completion_tokens": <cumulative>,
           "finish_reason": "" until the last event}`; an error is `data: {"error": "..."}`.
"""

from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import quote

from extproc.formats.openai import (
    OpenAIError,
    OpenAIRequest,
    Usage,
    chat_chunk,
    chat_completion,
    dumps,
    text_chunk,
    text_completion,
    unsupported_parameter,
    upstream_error,
    usage_chunk,
)
from extproc.formats.sse import DONE, SSEParser, encode_event

__all__ = [
    "check_supported",
    "generate_path",
    "generate_body",
    "gather_stream",
    "error_from_triton",
    "StreamTranslator",
]

CountTokens = Callable[[str], int]

_UINT64_MASK = 2**64 - 1
_BACKEND = "by the Triton backend"

# finish reasons Triton models may report -> OpenAI's; anything else is inferred
_FINISH = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "eos": "stop",
    "end_id": "stop",
    "stop_words": "stop",
    "max_tokens": "length",
}


def check_supported(req: OpenAIRequest) -> None:
    """Raise unsupported_parameter (400) for anything the Triton path cannot honour."""
    raw = req.raw
    if req.n != 1:
        raise unsupported_parameter("n", f"only n=1 is supported {_BACKEND}; got n={req.n}.")
    if req.endpoint == "chat":
        if req.logprobs:
            raise unsupported_parameter("logprobs", f"log probabilities are not available {_BACKEND}.")
        if req.top_logprobs:
            raise unsupported_parameter("top_logprobs", f"log probabilities are not available {_BACKEND}.")
    elif req.logprobs is not None:
        raise unsupported_parameter("logprobs", f"log probabilities are not available {_BACKEND}.")
    if req.tools:
        raise unsupported_parameter("tools", f"tool calling is not supported {_BACKEND}.")
    if raw.get("functions"):
        raise unsupported_parameter("functions", f"function calling is not supported {_BACKEND}.")
    if req.tool_choice is not None and req.tool_choice != "none":
        raise unsupported_parameter("tool_choice", f"tool calling is not supported {_BACKEND}; only 'none' is accepted.")
    fc = raw.get("function_call")
    if fc is not None and fc != "none":
        raise unsupported_parameter("function_call", f"function calling is not supported {_BACKEND}; only 'none' is accepted.")
    rf = req.response_format
    if rf is not None and rf.get("type") != "text":
        raise unsupported_parameter(
            "response_format", f"structured output ({rf.get('type')}) is not supported {_BACKEND}; only 'text'."
        )
    if req.best_of is not None and req.best_of != 1:
        raise unsupported_parameter("best_of", f"only best_of=1 is supported {_BACKEND}.")
    if req.echo:
        raise unsupported_parameter("echo", f"echoing the prompt is not supported {_BACKEND}.")
    if req.logit_bias:
        raise unsupported_parameter("logit_bias", f"logit bias is not supported {_BACKEND}.")
    if req.suffix:
        raise unsupported_parameter("suffix", f"insertion (suffix) is not supported {_BACKEND}.")
    if req.presence_penalty:
        raise unsupported_parameter("presence_penalty", f"penalties are not supported {_BACKEND}; use 0.")
    if req.frequency_penalty:
        raise unsupported_parameter("frequency_penalty", f"penalties are not supported {_BACKEND}; use 0.")
    if raw.get("audio") is not None:
        raise unsupported_parameter("audio", f"audio output is not supported {_BACKEND}.")
    modalities = raw.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise unsupported_parameter("modalities", f"only text output is supported {_BACKEND}.")
    if req.messages:
        for i, m in enumerate(req.messages):
            c = m.content
            if type(c) is list:
                for j, part in enumerate(c):
                    if part.get("type") != "text":
                        raise unsupported_parameter(
                            f"messages[{i}].content[{j}].type",
                            f"only text content is supported {_BACKEND}; got '{part.get('type')}'.",
                        )


def generate_path(model: str, stream: bool) -> str:
    """`/v2/models/<model>/generate` or `/generate_stream`, the model name URL-quoted."""
    return f"/v2/models/{quote(model, safe='')}/{'generate_stream' if stream else 'generate'}"


def generate_body(req: OpenAIRequest, prompt: str, *, default_max_tokens: int, stream: bool | None = None) -> bytes:
    """The JSON body for Triton's generate endpoints. Optional keys are sent only when the
    client set them; max_tokens falls back to `default_max_tokens`; ``stream`` (default: the
    client's) is what the model is asked for. A negative seed is mapped to its two's-complement
    uint64 (Triton's random_seed is unsigned)."""
    d: dict[str, Any] = {
        "text_input": prompt,
        "max_tokens": req.max_tokens if req.max_tokens is not None else default_max_tokens,
        "stream": req.stream if stream is None else stream,
    }
    if req.temperature is not None:
        d["temperature"] = req.temperature
    if req.top_p is not None:
        d["top_p"] = req.top_p
    if req.seed is not None:
        d["random_seed"] = req.seed & _UINT64_MASK
    if req.stop:
        stop = [s for s in req.stop if s]
        if stop:
            d["stop_words"] = stop
    return dumps(d)


def _scalar(v: Any) -> Any:
    """Triton may return a one-element tensor as a list."""
    if type(v) is list and len(v) == 1:
        return v[0]
    return v


def _count(v: Any) -> int | None:
    v = _scalar(v)
    if type(v) is int and v >= 0:
        return v
    if type(v) is float and v >= 0 and v.is_integer():
        return int(v)
    return None


def _text_output(v: Any) -> str:
    v = _scalar(v)
    if v is None:
        return ""
    if type(v) is str:
        return v
    if type(v) is list and all(type(x) is str for x in v):
        return "".join(v)
    raise TypeError("text_output is not a string")


def _prompt_text(req: OpenAIRequest, prompt: str | None) -> str:
    if prompt is not None:
        return prompt
    if req.prompt is not None:
        return req.prompt
    return "\n".join(m.text for m in req.messages or ())


def _finish(reported: Any, completion_tokens: int, limit: int | None) -> str:
    r = _scalar(reported)
    fr = _FINISH.get(r) if type(r) is str else None
    if fr is not None:
        return fr
    return "length" if limit is not None and completion_tokens >= limit else "stop"


def _error_message(obj: Any) -> str:
    e = obj.get("error") if type(obj) is dict else None
    if isinstance(e, dict):  # an OpenAI-style error object
        return str(e.get("message") or e)
    return str(e)


def error_from_triton(status: int, body: bytes) -> OpenAIError:
    """The OpenAIError for a non-2xx Triton response (`{"error": "..."}` or any text)."""
    try:
        obj = json.loads(body)
        msg = _error_message(obj) if type(obj) is dict and "error" in obj else None
    except (ValueError, RecursionError):
        msg = None
    if msg is None:
        msg = bytes(body[:500]).decode("utf-8", "replace").strip() or "(empty body)"
    return upstream_error(status, msg)


def gather_stream(body: bytes, **translation: Any) -> tuple[bytes, Usage]:
    """A whole Triton generate_stream body (SSE, one event per token) -> the OpenAI
    ``chat.completion`` / ``text_completion`` JSON a non-streaming client gets, and its usage;
    ``translation``: :class:`StreamTranslator`'s keyword arguments.

    Token counts come from the model's prompt_tokens/completion_tokens; when it did not report
    them, ``count_tokens`` is applied to the output text and to ``prompt`` (the rendered prompt;
    default: req.prompt or the message texts), else 0. ``max_tokens`` is the limit actually sent
    upstream (default req.max_tokens), used to infer finish_reason when the model did not report
    one. Raises OpenAIError for an
    error event, an event that is not JSON, or a body with no event at all (a stream cut short
    before its first token is the model server's failure, not an empty answer)."""
    t = StreamTranslator(**translation)
    t.feed(body)
    t.finish()
    if t.events == 0:
        raise upstream_error(502, "the model server ended the stream without sending any event")
    if t.error is not None:
        raise t.error
    text, usage = t.text, t.usage
    build = chat_completion if t.req.endpoint == "chat" else text_completion
    out = build(id=t.completion_id, model=t.model, created=t.created, text=text, finish_reason=t.finish_reason,
                usage=usage)
    return dumps(out), usage


_json_str = json.JSONEncoder().encode  # str -> JSON string literal (ASCII)
_CHUNK_TAIL = b',"logprobs":null,"finish_reason":null}]}\n\n'


class StreamTranslator:
    """Triton generate_stream SSE bytes -> OpenAI SSE bytes, chunk by chunk.

    Emits the role chunk (chat) at the first upstream event, one chunk per non-empty delta,
    and when the model reports a finish_reason: the finish chunk (empty delta, usage), the
    extra `choices: []` usage chunk if stream_options.include_usage, and `[DONE]`. `finish()`
    does the same if the upstream stream ended without a finish_reason. An upstream error
    event becomes `data: {"error": {...}}` + `[DONE]`. `[DONE]` is sent exactly once and
    nothing after it. `text` is the completion so far; `last_text` the part of it that the
    latest feed()/finish() call added. See gather_stream for `count_tokens`,
    `prompt` and `max_tokens`.
    """

    __slots__ = (
        "req", "completion_id", "created", "model", "count_tokens", "prompt", "max_tokens",
        "usage", "finish_reason", "error", "last_text", "_parts", "_fresh", "_parser", "_prefix", "_chat",
        "_started", "_closed", "_prompt_tokens", "_completion_tokens", "events",
    )

    def __init__(
        self,
        *,
        req: OpenAIRequest,
        completion_id: str,
        created: int,
        model: str,
        count_tokens: CountTokens | None = None,
        prompt: str | None = None,
        max_tokens: int | None = None,
    ):
        self.req = req
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.count_tokens = count_tokens
        self.prompt = prompt
        self.max_tokens = max_tokens if max_tokens is not None else req.max_tokens
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.error: OpenAIError | None = None
        self.last_text = ""
        self._parts: list[str] = []
        self._fresh: list[str] = []  # deltas added by the current feed()/finish() call
        self._parser = SSEParser()
        self._chat = req.endpoint == "chat"
        head = (
            b'data: {"id":' + _json_str(completion_id).encode()
            + b',"object":' + (b'"chat.completion.chunk"' if self._chat else b'"text_completion"')
            + b',"created":' + str(int(created)).encode()
            + b',"model":' + _json_str(model).encode()
        )
        self._prefix = head + (b',"choices":[{"index":0,"delta":' if self._chat else b',"choices":[{"index":0,"text":')
        self._started = False
        self._closed = False
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        self.events = 0  #: upstream events read (``[DONE]`` included)

    @property
    def text(self) -> str:
        """The completion text received so far."""
        parts = self._parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    def _collect_new(self) -> None:
        fresh = self._fresh
        if fresh:
            self.last_text = fresh[0] if len(fresh) == 1 else "".join(fresh)
            fresh.clear()

    @property
    def done(self) -> bool:
        """True once `[DONE]` has been emitted."""
        return self._closed

    def feed(self, chunk: bytes) -> bytes:
        """Translate whatever complete upstream events `chunk` finishes (b"" if none)."""
        self.last_text = ""
        if self._closed:
            return b""
        events = self._parser.feed(chunk)
        if not events:
            return b""
        out: list[bytes] = []
        for ev in events:
            self._event(ev.data, out)
            if self._closed:
                break
        self._collect_new()
        return b"".join(out)

    def finish(self) -> bytes:
        """At the end of the upstream stream: flush, close the OpenAI stream, `[DONE]` once."""
        self.last_text = ""
        if self._closed:
            return b""
        out: list[bytes] = []
        for ev in self._parser.flush():
            self._event(ev.data, out)
            if self._closed:
                break
        else:
            self._close(None, out)
        self._collect_new()
        return b"".join(out)

    def fail(self, error: OpenAIError) -> bytes:
        """End the stream with `error` (e.g. the upstream connection broke): error event + [DONE]."""
        self.last_text = ""
        if self._closed:
            return b""
        out: list[bytes] = []
        self._fail(error, out)
        return b"".join(out)

    # ------------------------------------------------------------------ internals

    def _fail(self, error: OpenAIError, out: list[bytes]) -> None:
        self.error = error
        out.append(encode_event(error.to_dict()))
        out.append(DONE)
        self._closed = True

    def _event(self, data: str, out: list[bytes]) -> None:
        self.events += 1
        if data == "[DONE]":
            return
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            self._fail(upstream_error(502, "the model server sent a stream event that is not valid JSON"), out)
            return
        if type(obj) is not dict:
            self._fail(upstream_error(502, "the model server sent a stream event that is not a JSON object"), out)
            return
        if "error" in obj:
            self._fail(upstream_error(500, _error_message(obj)), out)
            return
        try:
            delta = _text_output(obj.get("text_output"))
        except TypeError:
            self._fail(upstream_error(502, "the model server sent a non-string text_output"), out)
            return
        if not self._started:
            self._started = True
            if self._chat:
                out.append(self._prefix + b'{"role":"assistant","content":""}' + _CHUNK_TAIL)
        if delta:
            self._parts.append(delta)
            self._fresh.append(delta)
            if self._chat:
                out.append(self._prefix + b'{"content":' + _json_str(delta).encode() + b"}" + _CHUNK_TAIL)
            else:
                out.append(self._prefix + _json_str(delta).encode() + _CHUNK_TAIL)
        pt = _count(obj.get("prompt_tokens"))
        if pt is not None:
            self._prompt_tokens = pt
        ct = _count(obj.get("completion_tokens"))
        if ct is not None:
            self._completion_tokens = ct
        fr = obj.get("finish_reason")
        if fr:
            self._close(fr, out)

    def _close(self, reported: Any, out: list[bytes]) -> None:
        if not self._started:
            self._started = True
            if self._chat:
                out.append(self._prefix + b'{"role":"assistant","content":""}' + _CHUNK_TAIL)
        count = self.count_tokens
        pt = self._prompt_tokens
        if pt is None:
            pt = count(_prompt_text(self.req, self.prompt)) if count else 0
        ct = self._completion_tokens
        if ct is None:
            text = self.text
            ct = count(text) if count and text else 0
        usage = self.usage = Usage(pt, ct)
        fr = self.finish_reason = _finish(reported, ct, self.max_tokens)
        common = {"id": self.completion_id, "model": self.model, "created": self.created}
        if self._chat:
            final = chat_chunk(**common, delta={}, finish_reason=fr, usage=usage)
        else:
            final = text_chunk(**common, text="", finish_reason=fr, usage=usage)
        out.append(b"data: " + dumps(final) + b"\n\n")
        if self.req.include_usage:
            u = usage_chunk(endpoint=self.req.endpoint, **common, usage=usage)
            out.append(b"data: " + dumps(u) + b"\n\n")
        out.append(DONE)
        self._closed = True
