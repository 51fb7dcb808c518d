"""Play Envoy against the real ext_proc servicer in process and record every message it answers.

The driver builds a real :class:`Gateway`, runs one :meth:`ExternalProcessor.Process` stream per
request over a fake gRPC context, and feeds it what Envoy sends in the project's processing mode
(``envoy/envoy.yaml``: request headers, the buffered request body, response headers, the streamed
response body chunk by chunk, the last one with ``end_of_stream``). Every ``ProcessingResponse``
is recorded as text protobuf.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import text_format

from extproc.framework.gateway import Gateway
from extproc.framework.testing import triton_answer
from extproc.wire.processor import ExternalProcessor

REQUEST_ID = "golden-request"

# What is inherently non-deterministic in an answer, and only that:
_NORMALISE = [
    # completion ids are random (uuid4-based) per request
    (re.compile(rb"(chatcmpl|cmpl)-[0-9a-f]{8,}"), rb"\1-<id>"),
    # "created" is the wall-clock second the answer was made
    (re.compile(rb'\\"created\\": ?\d+'), rb'\\"created\\": <created>'),
    (re.compile(rb'"created": ?\d+'), rb'"created": <created>'),
    # a daily budget's Retry-After counts the seconds to the next UTC midnight
    (re.compile(rb'(key: "retry-after"\n\s*raw_value: ")\d+"'), rb'\1<seconds>"'),
    (re.compile(rb"Retry after \d+ s\."), rb"Retry after <seconds> s."),
]


def normalise(text: bytes) -> bytes:
    for pattern, repl in _NORMALISE:
        text = pattern.sub(repl, text)
    return text


def header_map(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


class FakeContext:
    """The part of grpc.aio's servicer context that :meth:`ExternalProcessor.Process` uses."""

    def __init__(self, messages: list[pb.ProcessingRequest]):
        self._pending = list(messages)
        self.written: list[pb.ProcessingResponse] = []

    async def read(self):
        if not self._pending:
            return grpc.aio.EOF
        if self.written and self.written[-1].HasField("immediate_response"):
            return grpc.aio.EOF
        return self._pending.pop(0)

    async def write(self, message: pb.ProcessingResponse) -> None:
        self.written.append(message)


@dataclass
class Exchange:
    """One request: what was sent to the service and what it answered, message by message."""

    sent: list[str] = field(default_factory=list)
    answers: list[pb.ProcessingResponse] = field(default_factory=list)

    def text(self) -> str:
        blocks = []
        for phase, answer in zip(self.sent, self.answers):
            rendered = text_format.MessageToString(answer, as_utf8=True).encode()
            blocks.append(f"# answer to {phase}\n".encode() + normalise(rendered))
        return b"".join(blocks).decode()


def triton_chunks(text: str, *, stream: bool) -> list[bytes]:
    """Triton's answer: generate_stream events whether the client streams or not."""
    return triton_answer(text, prompt_tokens=7)


def openai_chunks(text: str, *, stream: bool) -> list[bytes]:
    """An OpenAI-compatible upstream's answer: one JSON body, or SSE events ending with [DONE]."""
    if not stream:
        return [json.dumps({
            "id": "chatcmpl-upstream", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}).encode()]
    events = []
    for i, word in enumerate(text.split(" ")):
        events.append({"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 1,
                       "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                                    "finish_reason": None}]})
    events.append({"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
                   "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


async def play(gateway: Gateway, body: dict | bytes | None, *, path: str = "/v1/chat/completions",
               method: str = "POST", headers: dict[str, str] | None = None,
               upstream: str = "triton", answer: str = "Hello from the upstream",
               upstream_status: int = 200, upstream_body: bytes | None = None) -> Exchange:
    """Run one request through the servicer, as Envoy would, and record each answer."""
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    stream = isinstance(body, dict) and bool(body.get("stream"))
    req_headers = {":method": method, ":path": path, ":authority": "127.0.0.1:10000", "x-request-id": REQUEST_ID}
    if body is not None:
        req_headers.update({"content-type": "application/json", "content-length": str(len(raw))})
    req_headers.update(headers or {})
    messages = [(
        "request_headers",
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map(req_headers),
                                                            end_of_stream=body is None)),
    )]
    if body is not None:
        messages.append(("request_body", pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True))))
    if upstream_body is not None:
        chunks = [upstream_body]
    elif upstream == "openai":
        chunks = openai_chunks(answer, stream=stream)
    else:
        chunks = triton_chunks(answer, stream=stream)
    content_type = "text/event-stream" if stream and upstream_status == 200 else "application/json"
    messages.append(("response_headers", pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=header_map({":status": str(upstream_status), "content-type": content_type})))))
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        messages.append(("response_body", pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk,
                                                                                         end_of_stream=last))))
    servicer = ExternalProcessor(gateway.new_stream)
    context = FakeContext([m for _, m in messages])
    await servicer.Process(None, context)
    # A phase slower than a second also asks Envoy for more time (override_message_timeout): that
    # depends on the machine's speed, not on the service's answers, so it is not recorded.
    answers = [a for a in context.written if not a.HasField("override_message_timeout")]
    return Exchange(sent=[phase for phase, _ in messages][: len(answers)], answers=answers)
