"""The ext_proc wire layer over a real grpc.aio server, with a gRPC client playing Envoy."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.framework.config import load_config
from extproc.serving.server import SERVICE_NAME, start_worker
from extproc.framework.testing import triton_answer


def hmap(**headers) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k.replace("_", "-") if not k.startswith("_") else ":" + k[1:], raw_value=v.encode())
        for k, v in headers.items()
    ])


def chat_body(stream=False) -> bytes:
    return json.dumps({"model": "auto", "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
async def worker():
    config = load_config(None, overrides={"server": {"port": 0}, "plugins": [{"name": "model_tiers"}]})
    running = await start_worker(config)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel
    await channel.close()
    await running.drain_and_stop(0)


async def exchange(channel, messages):
    """Send every message on one stream; return every answer."""
    stub = pb_grpc.ExternalProcessorStub(channel)

    async def gen():
        for m in messages:
            yield m

    return [answer async for answer in stub.Process(gen())]


def request_phases(body: bytes):
    return [
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hmap(
            _method="POST", _path="/v1/chat/completions", content_length=str(len(body))))),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]


async def test_every_phase_answered_once_including_an_empty_final_chunk(worker):
    _, channel = worker
    chunks = triton_answer("one two three")
    messages = request_phases(chat_body(stream=True)) + [
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hmap(_status="200"))),
        *[pb.ProcessingRequest(response_body=pb.HttpBody(body=c)) for c in chunks],
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True)),  # empty final chunk
    ]
    answers = await exchange(channel, messages)
    kinds = [a.WhichOneof("response") for a in answers]
    assert kinds == [m.WhichOneof("request") for m in messages]
    # The request body answer rewrites path and body and re-picks the route.
    body_answer = answers[1].request_body.response
    assert body_answer.clear_route_cache
    set_headers = {h.header.key: h.header.raw_value.decode() for h in body_answer.header_mutation.set_headers}
    assert set_headers[":path"] == "/v2/models/llm-small/generate_stream"
    assert set_headers["x-extproc-tier"] == "small"
    assert json.loads(body_answer.body_mutation.body)["stream"] is True
    # The empty final chunk is answered, and carries the end of the OpenAI stream.
    streamed = b"".join(a.response_body.response.body_mutation.body for a in answers[3:])
    assert streamed.count(b"data: [DONE]") == 1
    assert streamed.endswith(b"data: [DONE]\n\n")


async def test_response_ending_in_trailers_has_its_trailers_answered(worker):
    _, channel = worker
    chunks = triton_answer("one two")
    messages = request_phases(chat_body()) + [
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hmap(_status="200"))),
        *[pb.ProcessingRequest(response_body=pb.HttpBody(body=c)) for c in chunks],  # none ends the stream
        pb.ProcessingRequest(response_trailers=pb.HttpTrailers(trailers=hmap(grpc_status="0"))),
    ]
    answers = await exchange(channel, messages)
    assert [a.WhichOneof("response") for a in answers] == [m.WhichOneof("request") for m in messages]


async def test_the_service_ends_the_stream_after_the_last_message_without_waiting_for_envoy(worker):
    """After answering the message that completes the response, the service closes the RPC (OK)
    itself: it does not wait for Envoy's half-close, which can race with Envoy resetting the stream."""
    _, channel = worker
    stub = pb_grpc.ExternalProcessorStub(channel)
    call = stub.Process()
    for m in request_phases(chat_body()):
        await call.write(m)
        assert (await call.read()).WhichOneof("response") == m.WhichOneof("request")
    await call.write(pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hmap(_status="200"))))
    await call.read()
    body = b"".join(triton_answer("done"))
    await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True)))
    assert (await call.read()).WhichOneof("response") == "response_body"
    # No done_writing() from the client: the server finishes on its own.
    assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_sse_event_split_across_two_chunks_is_translated(worker):
    _, channel = worker
    whole = b"".join(triton_answer("alpha beta"))
    cut = whole.index(b"beta") - 3  # inside the second event's JSON
    messages = request_phases(chat_body(stream=True)) + [
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hmap(_status="200"))),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=whole[:cut])),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=whole[cut:], end_of_stream=True)),
    ]
    answers = await exchange(channel, messages)
    first = answers[3].response_body.response.body_mutation
    second = answers[4].response_body.response.body_mutation
    text = b"".join([first.body, second.body]).decode()
    events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert content == "alpha beta"
    assert b"beta" not in first.body  # the split event waited for its second half


async def test_bad_input_answers_with_immediate_response_and_ends_the_stream(worker):
    _, channel = worker
    answers = await exchange(channel, request_phases(b'{"model": "auto"}'))
    assert len(answers) == 2
    imm = answers[1].immediate_response
    assert imm.status.code == 400
    assert json.loads(imm.body)["error"]["param"] == "messages"
    headers = {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}
    assert headers["content-type"] == "application/json"


async def test_client_internal_headers_are_removed(worker):
    _, channel = worker
    stub = pb_grpc.ExternalProcessorStub(channel)

    async def gen():
        yield pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hmap(
            _method="POST", _path="/v1/chat/completions", x_extproc_tier="large", x_extproc_tenant="root")))

    answers = [a async for a in stub.Process(gen())]
    removed = set(answers[0].request_headers.response.header_mutation.remove_headers)
    assert removed == {"x-extproc-tier", "x-extproc-tenant"}


async def test_a_request_let_through_turns_the_response_phases_on(worker):
    """Envoy's static mode has the response phases off (so its own local replies, codec errors
    above all, never wait on the service); the request-headers answer that lets a request through
    asks for them with mode_override. A refusal carries none."""
    from extproc.wire.processor import FORWARDED_MODE

    _, channel = worker
    answers = await exchange(channel, request_phases(chat_body())[:1])
    assert answers[0].HasField("request_headers")
    assert answers[0].mode_override == FORWARDED_MODE
    assert FORWARDED_MODE.response_header_mode == FORWARDED_MODE.SEND
    assert FORWARDED_MODE.response_body_mode == FORWARDED_MODE.STREAMED
    refused = await exchange(channel, [pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=hmap(_method="GET", _path="/nowhere"), end_of_stream=True))])
    assert refused[0].HasField("immediate_response") and not refused[0].HasField("mode_override")


async def test_health_serving_then_not_serving_on_drain():
    config = load_config(None, overrides={"server": {"port": 0}, "plugins": [{"name": "model_tiers"}]})
    running = await start_worker(config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.drain_and_stop(0)


async def test_a_bug_in_the_handler_is_answered_never_left_hanging():
    from extproc.wire.decisions import Reply
    from extproc.wire.processor import ExternalProcessor, add_to_server

    class Buggy:
        async def request_headers(self, headers, end_of_stream):
            raise KeyError("bug")

        async def stream_closed(self, cancelled):
            pass

        def internal_error(self, exc):
            return Reply(500, b'{"error": {"message": "internal"}}', [("content-type", "application/json")])

    server = grpc.aio.server()
    add_to_server(ExternalProcessor(Buggy), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answers = await exchange(channel, request_phases(chat_body())[:1])
        assert answers[0].immediate_response.status.code == 500
    finally:
        await server.stop(0)
