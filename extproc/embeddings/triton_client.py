"""Embeddings from Triton's ``embedder`` model (``triton_models/embedder``), over HTTP/1.1 with keep-alive.

One call sends a batch of texts as one KServe v2 ``infer`` request (input ``text``, BYTES
``[n, 1]``); the answer's ``embedding`` comes back as raw float32 (Triton's binary tensor
extension), not as 384 JSON numbers per text. Triton's dynamic batcher merges the calls of every
gateway worker into the model's batches. Connections are kept open and reused (a small pool per
event loop); no dependency beyond asyncio.

    client = TritonEmbeddingClient("http://127.0.0.1:8000", timeout=2.0)
    vectors = await client.embed(["a prompt", "another"])    # float32 [2, 384]

Every failure (refused, timed out, closed, a non-200 answer, a malformed one) is an
:class:`EmbedderUnavailable`: what the gateway does then is ``embeddings.on_unavailable``
(:mod:`extproc.embeddings.prompt`).
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import numpy as np

from extproc.wire.http1 import read_response

DIM = 384


class EmbedderUnavailable(RuntimeError):
    """Triton's embedder could not answer (down, not loaded, too slow, or a bad answer)."""


class TritonEmbeddingClient:
    """Async client of one Triton ``embedder`` model (see the module docstring)."""

    #: Texts per infer request: the model's ``max_batch_size`` is 64 (``triton_models/embedder``).
    MAX_TEXTS = 32

    def __init__(self, url: str, *, model: str = "embedder", timeout: float = 2.0, pool_size: int = 4):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"embeddings.triton_url: expected http://host:port, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.model = model
        self.timeout = timeout
        self.pool_size = pool_size
        self.path = f"{parts.path.rstrip('/')}/v2/models/{model}/infer"
        self._idle: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    def __repr__(self) -> str:
        return f"TritonEmbeddingClient(http://{self.host}:{self.port}, model={self.model!r})"

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-norm float32 embeddings ``[len(texts), 384]``, in order."""
        if not texts:
            return np.zeros((0, DIM), np.float32)
        if len(texts) > self.MAX_TEXTS:
            step = self.MAX_TEXTS
            parts = await asyncio.gather(*(self.embed(texts[i:i + step]) for i in range(0, len(texts), step)))
            return np.concatenate(parts)
        body = json.dumps({
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts), 1], "data": list(texts)}],
            "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}],
        }, ensure_ascii=False).encode("utf-8")
        try:
            return await asyncio.wait_for(self._call(body, len(texts)), self.timeout)
        except EmbedderUnavailable:
            raise
        except asyncio.TimeoutError:
            raise EmbedderUnavailable(f"{self!r}: no answer within {self.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise EmbedderUnavailable(f"{self!r}: {exc!r}") from None

    async def _call(self, body: bytes, n: int) -> np.ndarray:
        reader, writer = await self._connection()
        ok = False
        try:
            writer.write(
                f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode("ascii") + body)
            await writer.drain()
            status, headers, payload = await read_response(reader, keep_alive=True)
            vectors = _parse(status, headers, payload, n, self.model)
            ok = headers.get("connection", "").lower() != "close"
            return vectors
        finally:
            if ok:
                self._release(reader, writer)
            else:
                writer.close()

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        idle = self._idle.setdefault(asyncio.get_running_loop(), [])
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    def _release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        idle = self._idle.setdefault(asyncio.get_running_loop(), [])
        if len(idle) < self.pool_size:
            idle.append((reader, writer))
        else:
            writer.close()

    def close(self) -> None:
        """Close the idle connections of every loop."""
        for idle in self._idle.values():
            for _, writer in idle:
                writer.close()
        self._idle.clear()


def _parse(status: int, headers: dict[str, str], payload: bytes, n: int, model: str) -> np.ndarray:
    """The ``embedding`` output of an infer answer (binary or JSON data), checked for shape."""
    json_len = int(headers.get("inference-header-content-length", len(payload)))
    try:
        head = json.loads(payload[:json_len] or b"{}")
    except ValueError:
        raise EmbedderUnavailable(f"Triton answered {status} with a body that is not JSON") from None
    if status != 200:
        raise EmbedderUnavailable(f"Triton answered {status}: {str(head.get('error', head))[:200]}")
    out = next((o for o in head.get("outputs", []) if o.get("name") == "embedding"), None)
    if out is None:
        raise EmbedderUnavailable(f"{model}: no 'embedding' output in the answer")
    size = (out.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        vectors = np.frombuffer(payload[json_len:json_len + int(size)], dtype="<f4")
    else:
        vectors = np.asarray(out.get("data", []), dtype=np.float32)
    if vectors.size != n * DIM:
        raise EmbedderUnavailable(f"{model}: {vectors.size} values for {n} texts (expected {n * DIM})")
    return vectors.reshape(n, DIM).astype(np.float32, copy=True)
