"""The embeddings backend (``embeddings:``): Triton's embedder, its failure policy, the client.

Fakes stand in for Triton here; the real server's vectors are compared in
tests/triton/test_embedder_triton.py and the whole path in tests/e2e/test_embeddings_triton_e2e.py.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from extproc.embeddings import prompt as prompts
from extproc.embeddings.triton_client import EmbedderUnavailable, TritonEmbeddingClient
from extproc.framework.config import ConfigError, load_config
from tests.ports import free_port


def unit(texts, offset=0):
    out = np.zeros((len(texts), 384), np.float32)
    for i, t in enumerate(texts):
        out[i, (len(t) + offset) % 384] = 1.0
    return out


class LocalEncoder:
    def __init__(self):
        self.calls = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return unit(texts)


class FakeTriton:
    """Stands in for TritonEmbeddingClient: answers, or raises EmbedderUnavailable when ``down``."""

    def __init__(self, down=False):
        self.down = down
        self.calls = []

    async def embed(self, texts):
        self.calls.append(list(texts))
        if self.down:
            raise EmbedderUnavailable("connection refused")
        return unit(texts, offset=1)

    def close(self):
        pass


async def test_triton_computes_and_says_so():
    local, triton = LocalEncoder(), FakeTriton()
    embedder = prompts.PromptEmbedder(lambda: local, triton=triton)
    results = await asyncio.gather(*(embedder.batcher.encode_traced(f"t{i}") for i in range(5)))
    assert [s for _, s in results] == ["triton"] * 5
    assert sum(len(c) for c in triton.calls) == 5 and len(triton.calls) < 5 and local.calls == []
    assert embedder.backend == "triton" and embedder.texts["triton"] == 5


async def test_without_gateway_batching_each_prompt_is_its_own_triton_request():
    triton = FakeTriton()
    embedder = prompts.PromptEmbedder(LocalEncoder, triton=triton, batch_in_gateway=False)
    results = await asyncio.gather(*(embedder.embed_text_traced(f"t{i}") for i in range(4)))
    assert [s for _, s in results] == ["triton"] * 4 and sorted(map(len, triton.calls)) == [1, 1, 1, 1]


async def test_unavailable_falls_back_in_process_then_skips_triton_for_retry_seconds():
    local, triton = LocalEncoder(), FakeTriton(down=True)
    embedder = prompts.PromptEmbedder(lambda: local, triton=triton, on_unavailable="local", retry_seconds=60)
    vector, source = await embedder.batcher.encode_traced("hello")
    assert source == "local_fallback" and vector[len("hello") % 384] == 1.0
    _, source = await embedder.batcher.encode_traced("again")
    assert source == "local_fallback" and len(triton.calls) == 1  # not asked again within retry_seconds
    assert embedder.texts == {"local": 0, "triton": 0, "local_fallback": 2} and embedder.triton_failures == 1


async def test_triton_is_asked_again_after_retry_seconds():
    triton = FakeTriton(down=True)
    embedder = prompts.PromptEmbedder(LocalEncoder, triton=triton, retry_seconds=0)
    assert (await embedder.batcher.encode_traced("a"))[1] == "local_fallback"
    triton.down = False
    assert (await embedder.batcher.encode_traced("b"))[1] == "triton"


async def test_fail_policy_raises_to_every_waiter():
    local = LocalEncoder()
    embedder = prompts.PromptEmbedder(lambda: local, triton=FakeTriton(down=True), on_unavailable="fail")
    results = await asyncio.gather(*(embedder.batcher.encode(str(i)) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, EmbedderUnavailable) for r in results) and local.calls == []


async def test_start_up_work_falls_back_whatever_the_policy():
    local = LocalEncoder()
    embedder = prompts.PromptEmbedder(lambda: local, triton=FakeTriton(down=True), on_unavailable="fail")
    vectors = await embedder.embed_many(["example one", "example two"])
    assert vectors.shape == (2, 384) and local.calls == [["example one", "example two"]]


async def test_prompt_embedding_records_the_source_on_the_request():
    from extproc.formats.openai import parse_request
    from extproc.framework.context import RequestContext

    embedder = prompts.PromptEmbedder(LocalEncoder, triton=FakeTriton())
    ctx = RequestContext("r1", "POST", "/v1/chat/completions", {})
    ctx.endpoint = "chat"
    ctx.request = parse_request("chat", json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode())
    await prompts.prompt_embedding(ctx, embedder)
    assert ctx.embedding_sources == ["triton"] and ctx.embedding_calls == 1


def test_local_fallback_loads_the_encoder_at_start_up_and_fail_does_not():
    loaded = []
    prompts.PromptEmbedder(lambda: loaded.append(1) or LocalEncoder(), triton=FakeTriton()).load()
    prompts.PromptEmbedder(lambda: loaded.append(2) or LocalEncoder(), triton=FakeTriton(),
                           on_unavailable="fail").load()
    assert loaded == [1]


def test_configuration_block(monkeypatch):
    cfg = load_config(None)
    assert cfg.embeddings.backend == "local" and cfg.embeddings.on_unavailable == "local"
    cfg = load_config(None, overrides={"embeddings": {"backend": "triton", "triton_url": "http://127.0.0.1:8000/",
                                                      "on_unavailable": "fail", "timeout_seconds": 0.5}})
    assert cfg.embeddings.triton_url == "http://127.0.0.1:8000"
    for bad in ({"backend": "gpu"}, {"triton_url": "grpc://x:8001"}, {"on_unavailable": "ignore"},
                {"timeout_seconds": 0}, {"bogus": 1}):
        with pytest.raises(ConfigError, match="embeddings"):
            load_config(None, overrides={"embeddings": bad})

    monkeypatch.setattr(prompts, "_shared", None)
    first = prompts.configure_prompt_embedder(cfg.embeddings)
    assert first.backend == "triton" and first.on_unavailable == "fail" and first.triton.timeout == 0.5
    assert prompts.configure_prompt_embedder(cfg.embeddings) is first  # same settings: same embedder
    assert prompts.prompt_embedder() is first
    local = prompts.configure_prompt_embedder(load_config(None).embeddings)
    assert local.backend == "local" and local is not first
    assert prompts.configure_prompt_embedder(None) is local


# ---------------------------------------------------------------- the client, against a fake server


async def serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_request(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return head, json.loads(await reader.readexactly(length))


def binary_answer(vectors: np.ndarray) -> bytes:
    data = vectors.astype("<f4").tobytes()
    head = json.dumps({"model_name": "embedder", "outputs": [{"name": "embedding", "datatype": "FP32",
                       "shape": list(vectors.shape), "parameters": {"binary_data_size": len(data)}}]}).encode()
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: "
            f"{len(head)}\r\nContent-Length: {len(head) + len(data)}\r\n\r\n").encode() + head + data


async def test_client_sends_one_infer_per_batch_and_reads_the_binary_answer_on_one_connection():
    seen, connections = [], []

    async def handler(reader, writer):
        connections.append(1)
        while True:
            try:
                head, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            seen.append((head.split(b" ")[1], body))
            n = body["inputs"][0]["shape"][0]
            writer.write(binary_answer(unit(body["inputs"][0]["data"])[:n]))
            await writer.drain()
        writer.close()

    server, port = await serve(handler)
    async with server:
        client = TritonEmbeddingClient(f"http://127.0.0.1:{port}")
        out = await client.embed(["naïve café 東京", "b"])
        again = await client.embed(["c"])
        client.close()
    assert out.shape == (2, 384) and again.shape == (1, 384)
    assert np.array_equal(out, unit(["naïve café 東京", "b"]))
    path, body = seen[0]
    assert path == b"/v2/models/embedder/infer"
    assert body["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": ["naïve café 東京", "b"]}
    assert body["outputs"] == [{"name": "embedding", "parameters": {"binary_data": True}}]
    assert len(connections) == 1  # kept alive and reused


async def test_client_splits_batches_larger_than_the_models():
    sizes = []

    async def handler(reader, writer):
        while True:
            try:
                _, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            sizes.append(len(body["inputs"][0]["data"]))
            writer.write(binary_answer(unit(body["inputs"][0]["data"])))
            await writer.drain()

    server, port = await serve(handler)
    async with server:
        texts = [f"text {i}" for i in range(72)]
        out = await TritonEmbeddingClient(f"http://127.0.0.1:{port}").embed(texts)
    assert sorted(sizes) == [8, 32, 32] and np.array_equal(out, unit(texts))


async def test_client_failures_are_embedder_unavailable():
    async def error(reader, writer):
        await read_request(reader)
        body = b'{"error":"Request for unknown model: \'embedder\' is not found"}'
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    async def silent(reader, writer):
        await asyncio.sleep(5)

    async def short(reader, writer):
        _, body = await read_request(reader)
        writer.write(binary_answer(np.zeros((1, 384), np.float32)))  # one vector for two texts
        await writer.drain()

    for handler, message in ((error, "400"), (silent, "no answer within"), (short, "expected 768")):
        server, port = await serve(handler)
        async with server:
            with pytest.raises(EmbedderUnavailable, match=message):
                await TritonEmbeddingClient(f"http://127.0.0.1:{port}", timeout=0.3).embed(["a", "b"])
    with pytest.raises(EmbedderUnavailable):
        await TritonEmbeddingClient(f"http://127.0.0.1:{free_port()}").embed(["nobody listens"])


def test_extproc_up_loads_the_embedder_and_points_the_service_at_it(tmp_path):
    import argparse

    from extproc.commands.cli import _overrides
    from extproc.commands.stack import Stack, StackPorts, service_command

    assert Stack(tmp_path).triton_models_loaded() == ["llm-small", "llm-medium", "llm-large"]
    assert Stack(tmp_path, embedder=True).triton_models_loaded() == ["llm-small", "llm-medium", "llm-large", "embedder"]
    assert Stack(tmp_path, models=("llm-small", "embedder"), embedder=True).triton_models_loaded() == \
        ["llm-small", "embedder"]
    cmd = service_command(None, 50051, 2, None, embeddings_triton_url="http://127.0.0.1:18000")
    assert cmd[cmd.index("--embeddings-triton-url") + 1] == "http://127.0.0.1:18000"
    assert "--embeddings-triton-url" not in service_command(None, 50051, 2, None)
    args = argparse.Namespace(embeddings_triton_url="http://127.0.0.1:18000")
    assert _overrides(args) == {"embeddings": {"triton_url": "http://127.0.0.1:18000"}}
    assert StackPorts().triton_http == 8000


def test_the_configured_runtime_builds_the_local_encoder(monkeypatch):
    asked = []
    monkeypatch.setattr(prompts, "get_encoder", lambda runtime=None: asked.append(runtime) or LocalEncoder())
    monkeypatch.setattr(prompts, "_shared", None)
    default = prompts.configure_prompt_embedder(load_config(None).embeddings)
    default.load()
    numpy_one = prompts.configure_prompt_embedder(load_config(None, overrides={"embeddings": {"runtime": "numpy"}}).embeddings)
    assert numpy_one is not default and numpy_one.runtime == "numpy"
    numpy_one.load()
    assert asked == ["numpy"]  # the default embedder builds get_encoder() from encoder.py itself
    with pytest.raises(ConfigError, match="runtime"):
        load_config(None, overrides={"embeddings": {"runtime": "tensorflow"}})
