"""Answers the caching policies keep and replay: capture, serialisation, replay, bookkeeping.

* :class:`AnswerCapture` reads the answer as it goes to the client (the OpenAI JSON body, or the
  SSE events of a stream, whichever upstream kind produced them) and yields a
  :class:`CachedAnswer` only for a complete, single-choice text answer; anything else (an error
  event, tool calls, several choices, no finish reason, too large) is not cacheable and says why.
* :meth:`CachedAnswer.to_bytes` / :meth:`CachedAnswer.from_bytes`: compact JSON, versioned.
* :func:`render` replays an answer as the client asked for it: a ``chat.completion`` /
  ``text_completion`` JSON body, or for ``stream: true`` proper SSE (role chunk, content chunk,
  finish chunk with usage, the ``include_usage`` chunk when asked, ``data: [DONE]``) with
  ``content-type: text/event-stream``. A stream request can be answered from a JSON one and the
  other way round.
* :func:`serve` turns a found answer into the :class:`~extproc.wire.decisions.Reply` and records the
  shared facts (``ctx.cache_status``, ``ctx.cache_lookups``, ``ctx.tokens_saved``,
  ``ctx.cost_saved_usd``) and the response headers (``x-extproc-cache``, ``age``,
  ``x-extproc-cache-similarity``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from extproc.formats import openai as oai
from extproc.wire.decisions import Reply
from extproc.formats.sse import DONE, SSEParser

if TYPE_CHECKING:
    from extproc.framework.context import RequestContext

__all__ = [
    "CachedAnswer", "AnswerCapture", "render", "serve", "note_lookup", "note_miss",
    "CACHE_HEADER", "SIMILARITY_HEADER",
]

CACHE_HEADER = "x-extproc-cache"
SIMILARITY_HEADER = "x-extproc-cache-similarity"
_FORMAT = 1


@dataclass(slots=True)
class CachedAnswer:
    """One complete answer, independent of how it was delivered (JSON or SSE)."""

    endpoint: str  # "chat" | "completions"
    model: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    id: str = ""  # the original completion id (replayed only for idempotent retries)
    created: int = 0  # the original creation time (idem)
    stored_at: float = 0.0  # unix time it was stored
    query: str | None = None  # the text a semantic entry was matched by (for the guard)
    body_hash: str | None = None  # idempotency: the digest of the original request body
    tier: str | None = None  # the tier that produced it

    def to_bytes(self) -> bytes:
        # The fields by name (dataclasses.asdict deep-copies them: ~3x the time of the JSON itself).
        d = {name: getattr(self, name) for name in _FIELDS}
        d["f"] = _FORMAT
        return oai.dumps(d)

    @classmethod
    def from_bytes(cls, data: bytes) -> "CachedAnswer":
        """Parse a stored answer; ValueError if it is not one (corrupt, or another format)."""
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"stored answer is not JSON: {exc}") from None
        if not isinstance(d, dict) or d.pop("f", None) != _FORMAT:
            raise ValueError("stored answer has an unknown format")
        try:
            answer = cls(**d)
        except TypeError as exc:
            raise ValueError(f"stored answer has unexpected fields: {exc}") from None
        if not isinstance(answer.text, str) or not isinstance(answer.completion_tokens, int):
            raise ValueError("stored answer has fields of the wrong type")
        return answer

    def age(self, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - self.stored_at)


_FIELDS = tuple(f.name for f in dataclasses.fields(CachedAnswer))


class AnswerCapture:
    """Collects the answer sent to the client, chunk by chunk, within a byte bound."""

    __slots__ = ("endpoint", "stream", "max_bytes", "reason", "_size", "_buffer", "_parser",
                 "_parts", "_finish", "_model", "_id", "_created", "_usage", "fed_index", "_result")

    def __init__(self, endpoint: str, stream: bool, max_bytes: int = 256 * 1024):
        self.endpoint, self.stream, self.max_bytes = endpoint, stream, max_bytes
        self.reason: str | None = None  # why the answer is not cacheable (None: so far so good)
        self._size = 0
        self._buffer = bytearray()
        self._parser = SSEParser() if stream else None
        self._parts: list[str] = []
        self._finish: str | None = None
        self._model = ""
        self._id = ""
        self._created = 0
        self._usage: oai.Usage | None = None
        self.fed_index = 0  # the last ResponseChunk.index fed (see feed_shared_capture)
        self._result: CachedAnswer | None = None

    @property
    def size(self) -> int:
        """Bytes of the answer seen so far."""
        return self._size

    def feed(self, data: bytes) -> None:
        """One chunk of what the client receives (the JSON body, or SSE bytes).

        Only kept here (within the bound): the parsing waits for :meth:`result`, so that a stream's
        chunks, its first above all, go on to the client without it."""
        if self.reason is not None or not data:
            return
        self._size += len(data)
        if self._size > self.max_bytes:
            self._drop("too large")
            return
        self._buffer += data

    def _drop(self, reason: str) -> None:
        self.reason = reason
        self._buffer = bytearray()
        self._parts = []

    def _choice(self, obj: dict) -> dict | None:
        choices = obj.get("choices")
        if not isinstance(choices, list):
            self._drop("no choices")
            return None
        if len(choices) > 1 or any(isinstance(c, dict) and c.get("index", 0) != 0 for c in choices):
            self._drop("several choices")
            return None
        return choices[0] if choices and isinstance(choices[0], dict) else {}

    def _meta(self, obj: dict) -> None:
        self._model = obj.get("model") or self._model
        self._id = obj.get("id") or self._id
        created = obj.get("created")
        if isinstance(created, int):
            self._created = created
        usage = oai.usage_from_openai(obj)
        if usage is not None:
            self._usage = usage

    def _event(self, data: str) -> None:
        if data == "[DONE]":
            return
        try:
            obj = json.loads(data)
        except ValueError:
            self._drop("unparseable event")
            return
        if not isinstance(obj, dict) or "error" in obj:
            self._drop("error event")
            return
        self._meta(obj)
        choice = self._choice(obj)
        if choice is None or not choice:
            return
        if self.endpoint == "chat":
            delta = choice.get("delta") or {}
            if delta.get("tool_calls") or delta.get("function_call"):
                self._drop("tool calls")
                return
            content = delta.get("content")
        else:
            content = choice.get("text")
        if isinstance(content, str) and content:
            self._parts.append(content)
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]

    def result(self, usage: oai.Usage | None = None, *, max_bytes: int | None = None) -> "CachedAnswer | None":
        """The complete answer, or None (``reason`` says why). ``usage``: the gateway's count.

        Every call returns a fresh copy (callers annotate it); the parsing is done once.
        ``max_bytes``: None also when the answer is larger than this caller accepts.
        """
        if self.reason is not None or (max_bytes is not None and self._size > max_bytes):
            return None
        if self._result is None:
            self._result = self._complete(usage)
        return dataclasses.replace(self._result) if self._result is not None else None

    def _complete(self, usage: oai.Usage | None) -> "CachedAnswer | None":
        if self.reason is not None:
            return None
        if self._parser is None:
            try:
                obj = json.loads(bytes(self._buffer))
            except ValueError:
                self._drop("unparseable body")
                return None
            if not isinstance(obj, dict) or "error" in obj:
                self._drop("error body")
                return None
            self._meta(obj)
            choice = self._choice(obj)
            if choice is None:
                return None
            if self.endpoint == "chat":
                message = choice.get("message") or {}
                if message.get("tool_calls") or message.get("function_call"):
                    self._drop("tool calls")
                    return None
                text = message.get("content")
            else:
                text = choice.get("text")
            if not isinstance(text, str):
                self._drop("no text")
                return None
            self._parts = [text]
            self._finish = choice.get("finish_reason")
        else:
            parser, data = self._parser, bytes(self._buffer)
            self._buffer = bytearray()
            for event in (*parser.feed(data), *parser.flush()):
                self._event(event.data)
                if self.reason is not None:
                    return None
        if self.reason is not None:
            return None
        if not self._finish:
            self._drop("incomplete (no finish reason)")
            return None
        usage = usage or self._usage
        if usage is None:
            self._drop("no usage")
            return None
        return CachedAnswer(self.endpoint, self._model, "".join(self._parts), self._finish,
                            usage.prompt_tokens, usage.completion_tokens, self._id, self._created)


_SHARED = "_answer_capture"


def shared_capture(ctx, max_bytes: int) -> AnswerCapture:
    """The request's one :class:`AnswerCapture`, shared by every policy that keeps the answer.

    Each policy asks for it in its request phase (the largest bound asked for applies; each
    passes its own to :meth:`AnswerCapture.result`), feeds it with :func:`feed_shared_capture` from
    ``extproc_response_chunk`` (a chunk is parsed once, however many policies feed it), and reads
    ``result(ctx.usage, max_bytes=...)`` on completion.
    """
    capture = ctx.plugin_state.get(_SHARED)
    if capture is None:
        capture = ctx.plugin_state[_SHARED] = AnswerCapture(ctx.endpoint, ctx.stream, max_bytes)
    elif max_bytes > capture.max_bytes:
        capture.max_bytes = max_bytes
    return capture


def completed_answer(ctx, max_bytes: int) -> CachedAnswer | None:
    """The request's answer, ready to store: None unless the upstream answered 200 and the shared
    capture holds a complete answer of at most ``max_bytes``; stamped with the time and the tier."""
    capture = ctx.plugin_state.get(_SHARED)
    if capture is None or ctx.response_status != 200:
        return None
    answer = capture.result(ctx.usage, max_bytes=max_bytes)
    if answer is not None:
        answer.stored_at = time.time()
        answer.tier = ctx.tier
    return answer


def feed_shared_capture(ctx, chunk) -> None:
    """Feed a response chunk to the request's shared capture, once whoever calls first."""
    capture = ctx.plugin_state.get(_SHARED)
    if capture is not None and chunk.index > capture.fed_index:
        capture.fed_index = chunk.index
        capture.feed(chunk.data)


def render(answer: CachedAnswer, *, stream: bool, include_usage: bool = False, completion_id: str | None = None,
           created: int | None = None, prompt_tokens: int | None = None) -> tuple[bytes, str]:
    """The answer as the client asked for it: ``(body, content_type)``.

    ``completion_id``/``created`` default to fresh ones (a cache hit is a new response);
    ``prompt_tokens`` overrides the stored count (a semantic hit's prompt is not the stored one).
    """
    cid = completion_id or oai.new_completion_id(answer.endpoint)  # type: ignore[arg-type]
    when = created if created is not None else int(time.time())
    usage = oai.Usage(answer.prompt_tokens if prompt_tokens is None else prompt_tokens, answer.completion_tokens)
    common = {"id": cid, "model": answer.model, "created": when}
    chat = answer.endpoint == "chat"
    if not stream:
        build = oai.chat_completion if chat else oai.text_completion
        return oai.dumps(build(**common, text=answer.text, finish_reason=answer.finish_reason, usage=usage)), \
            "application/json"
    events = []
    if chat:
        events.append(oai.chat_chunk(**common, delta={"role": "assistant", "content": ""}))
        if answer.text:
            events.append(oai.chat_chunk(**common, delta={"content": answer.text}))
        events.append(oai.chat_chunk(**common, delta={}, finish_reason=answer.finish_reason, usage=usage))
    else:
        if answer.text:
            events.append(oai.text_chunk(**common, text=answer.text))
        events.append(oai.text_chunk(**common, text="", finish_reason=answer.finish_reason, usage=usage))
    if include_usage:
        events.append(oai.usage_chunk(endpoint=answer.endpoint, **common, usage=usage))  # type: ignore[arg-type]
    body = b"".join(b"data: " + oai.dumps(e) + b"\n\n" for e in events) + DONE
    return body, "text/event-stream"


def note_lookup(ctx: "RequestContext", layer: str, result: str) -> None:
    """Record one cache lookup (``layer``: exact, semantic, coalescing, idempotency)."""
    ctx.cache_lookups.append((layer, result))


def note_miss(ctx: "RequestContext") -> None:
    """No layer answered (so far): status ``miss`` unless a layer already said something."""
    if ctx.cache_status is None:
        ctx.cache_status = "miss"
        ctx.response_headers[CACHE_HEADER] = "miss"


def note_bypass(ctx: "RequestContext") -> None:
    """The client asked not to be answered from a cache (``Cache-Control: no-cache``)."""
    if ctx.cache_status in (None, "miss"):
        ctx.cache_status = "bypass"
        ctx.response_headers[CACHE_HEADER] = "bypass"


def serve(ctx: "RequestContext", answer: CachedAnswer, *, status: str, layer: str,
          similarity: float | None = None, replay: bool = False, prompt_tokens: int | None = None,
          tier_config=None) -> Reply:
    """Answer ``ctx`` with ``answer`` and record what was saved.

    :param status: ``hit``, ``semantic_hit``, ``coalesced`` or ``idempotent`` (``ctx.cache_status``
        and the ``x-extproc-cache`` header).
    :param replay: keep the original completion id and time (an idempotent retry gets the very
        same response); otherwise the reply is a new response with a fresh id.
    :param prompt_tokens: this request's prompt tokens when they differ from the stored answer's
        (a semantic hit); reported in ``usage`` and counted as saved.
    :param tier_config: the tier whose price the savings are counted at, when ``ctx`` has none yet
        (an answer served before the tier is chosen).
    """
    req = ctx.request
    body, content_type = render(
        answer, stream=req.stream, include_usage=req.include_usage,
        completion_id=answer.id if replay and answer.id else None,
        created=answer.created if replay and answer.created else None,
        prompt_tokens=prompt_tokens)
    ctx.cache_status = status
    note_lookup(ctx, layer, "hit")
    saved_prompt = answer.prompt_tokens if prompt_tokens is None else prompt_tokens
    ctx.tokens_saved += saved_prompt + answer.completion_tokens
    tier = ctx.tier_config or tier_config
    if tier is not None:
        ctx.cost_saved_usd += (saved_prompt * tier.price.prompt_per_1k
                               + answer.completion_tokens * tier.price.completion_per_1k) / 1000.0
    ctx.cost_usd = 0.0
    headers = ctx.response_headers
    headers[CACHE_HEADER] = status
    if answer.stored_at:
        headers["age"] = str(int(answer.age()))
    if similarity is not None:
        headers[SIMILARITY_HEADER] = f"{similarity:.4f}"
    extra = [("content-type", content_type)]
    if req.stream:
        extra.append(("cache-control", "no-cache"))
    if ctx.tier is not None:
        extra.append(("x-extproc-tier", ctx.tier))
    return Reply(200, body, extra, details=f"extproc_cache_{status}")
