"""What policies read of one request's prompt, computed once per request and shared.

* **the text a policy judges** (:func:`route_text`): the last user message of a chat (the prompt of
  a completion), clipped to :data:`ROUTE_TEXT_CHARS` -- the encoder reads at most 256 word pieces
  (~1,000 characters) anyway, and tokenizing a 1 MB prompt just to throw most of it away would cost
  more than the policy itself;
* **its token count** (:func:`prompt_tokens`), kept in ``ctx.prompt_tokens_estimate``;
* **one embedding per request** (:func:`prompt_embedding`): the semantic routes, the learned
  router and the semantic cache all need the MiniLM embedding of the same text; the first to ask
  computes it (off the event loop, batched with other requests' texts), the others get it from the
  request, and a small per-process LRU serves repeated prompts.

Where embeddings are computed is one process-wide choice (the ``embeddings:`` block of the
configuration, :func:`configure_prompt_embedder`): ``local``, MiniLM in this process (ONNX Runtime or NumPy,
``embeddings.runtime``; in the batcher's thread); or ``triton``, the ``embedder`` model of a Triton server
(:mod:`extproc.embeddings.triton_client`; on GPUs in production), the same vectors. When Triton's
embedder cannot answer (down, not loaded, slower than ``timeout_seconds``), ``on_unavailable``
decides: ``local`` computes the batch in process instead (the request is served as before, counted
as ``local_fallback``), ``fail`` raises :class:`EmbedderUnavailable` to the policy that asked (its
``on_error`` then decides: fail_open goes on without it). After a failure Triton is not asked again
for ``retry_seconds``, so an outage costs one timeout, not one per request. Start-up work (a
policy's example utterances) falls back to the local encoder whatever ``on_unavailable`` says: it
is the deployment's own text, and Triton may still be loading its models.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

import numpy as np

from extproc.embeddings.encoder import get_encoder
from extproc.embeddings.triton_client import EmbedderUnavailable, TritonEmbeddingClient

if TYPE_CHECKING:
    from extproc.framework.config import EmbeddingsConfig
    from extproc.framework.context import RequestContext

log = logging.getLogger(__name__)

__all__ = ["EmbedderUnavailable", "EmbeddingBatcher", "EmbeddingCache", "PromptEmbedder",
           "configure_prompt_embedder", "prompt_embedder", "prompt_embedding"]

LOCAL, TRITON, LOCAL_FALLBACK = "local", "triton", "local_fallback"
"""Where an embedding was computed (``ctx.embedding_sources``, ``extproc_embeddings_total{backend}``)."""



ROUTE_TEXT_CHARS = 2000
"""Characters of the prompt a router looks at (the encoder truncates at 256 word pieces anyway)."""



EMBEDDING_CACHE_ENTRIES = 4096
"""Embeddings kept per worker process for repeated prompts (~1.6 KB each: ~7 MB at most)."""



_EMBEDDING_KEY = "routing.embedding"



def clip_text(text: str, max_chars: int = ROUTE_TEXT_CHARS) -> str:
    """``text`` without surrounding whitespace, at most ``max_chars`` characters (its beginning)."""
    text = text.strip()
    return text[:max_chars] if len(text) > max_chars else text



def last_user_text(ctx: "RequestContext") -> str:
    """The last user message (chat; the last message when none is the user's) or the prompt
    (completions), whole."""
    req = ctx.request
    if req is None:
        return ""
    if req.messages:
        for message in reversed(req.messages):
            if message.role == "user":
                return message.text
        return req.messages[-1].text
    return req.prompt or ""


def route_text(ctx: "RequestContext", max_chars: int = ROUTE_TEXT_CHARS) -> str:
    """The text routers judge: :func:`last_user_text`, clipped."""
    return clip_text(last_user_text(ctx), max_chars)



def prompt_tokens(ctx: "RequestContext", encoding: str = "cl100k_base") -> int:
    """Tokens of the whole prompt (every message), counted once per request.

    Kept in ``ctx.prompt_tokens_estimate`` (another policy may already have set it).
    """
    if ctx.prompt_tokens_estimate is None:
        ctx.prompt_tokens_estimate = _count(ctx, encoding)
    return ctx.prompt_tokens_estimate



LARGE_PROMPT_CHARS = 65_536
"""Prompts longer than this are counted off the event loop (tiktoken: ~45 ms per MB)."""



async def prompt_tokens_async(ctx: "RequestContext", encoding: str = "cl100k_base") -> int:
    """:func:`prompt_tokens`, counted in a thread when the prompt is large (the event loop keeps
    serving other streams meanwhile)."""
    if ctx.prompt_tokens_estimate is None:
        req = ctx.request
        chars = sum(len(m.text) for m in req.messages) if req.messages is not None else len(req.prompt or "")
        if chars > LARGE_PROMPT_CHARS:
            count = await asyncio.to_thread(_count, ctx, encoding)
            if ctx.prompt_tokens_estimate is None:
                ctx.prompt_tokens_estimate = count
    return prompt_tokens(ctx, encoding)



def _count(ctx: "RequestContext", encoding: str) -> int:
    from extproc.formats import tokens

    req = ctx.request
    if req.messages is not None:
        return tokens.count_chat(req.messages, encoding)
    return tokens.count_text(req.prompt or "", encoding)



def prompt_tokens_ready(encoding: str = "cl100k_base") -> None:
    """Load the token counter's tables now (start-up) instead of on the first request (~0.1 s)."""
    from extproc.formats import tokens

    tokens.get_encoding(encoding)



class EmbeddingBatcher:
    """Computes embeddings off the event loop, one thread per process, batching concurrent asks.

    While one batch is being encoded, texts from other requests queue up and go together in the
    next one (up to ``max_batch``): at 16 concurrent clients the encoder runs a few batches instead
    of 16 single passes, and the event loop never blocks on NumPy. One thread, because a worker
    process owns about one core and NumPy already uses it fully.
    """

    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_batch: int = 32, *,
                 encode_async: "Callable[[list[str]], Awaitable[tuple[np.ndarray, str]]] | None" = None):
        """:param encode: computes a batch in the batcher's thread (the local encoder).
        :param encode_async: instead, a coroutine function returning ``(vectors, source)`` (Triton)."""
        self._encode = encode
        self._encode_async = encode_async
        self.max_batch = max_batch
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queues: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopQueue]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.batches = 0  #: encoder calls made (for tests and stats)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="extproc-embed")
            return self._executor

    async def _run(self, loop: asyncio.AbstractEventLoop, texts: list[str]) -> tuple[np.ndarray, str]:
        if self._encode_async is not None:
            return await self._encode_async(texts)
        return await loop.run_in_executor(self._pool(), self._encode, texts), LOCAL

    async def encode(self, text: str) -> np.ndarray:
        """The embedding of one text (float32, unit norm)."""
        return (await self.encode_traced(text))[0]

    async def encode_traced(self, text: str) -> tuple[np.ndarray, str]:
        """``(embedding, source)``: the embedding of one text and where it was computed."""
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _LoopQueue()
        future = loop.create_future()
        queue.items.append((text, future))
        if not queue.running:
            queue.running = True
            loop.create_task(self._drain(loop, queue))
        return await future

    async def encode_many(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of many texts in one call (start-up work: example utterances)."""
        if not texts:
            return np.zeros((0, 384), np.float32)
        loop = asyncio.get_running_loop()
        self.batches += 1
        return (await self._run(loop, list(texts)))[0]

    async def _drain(self, loop: asyncio.AbstractEventLoop, queue: "_LoopQueue") -> None:
        try:
            while queue.items:
                batch = queue.items[: self.max_batch]
                del queue.items[: self.max_batch]
                live = [(t, f) for t, f in batch if not f.done()]
                if not live:
                    continue
                self.batches += 1
                try:
                    vectors, source = await self._run(loop, [t for t, _ in live])
                except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                    for _, future in live:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, future), vector in zip(live, vectors):
                    if not future.done():
                        future.set_result((vector, source))
        finally:
            queue.running = False

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None



class _LoopQueue:
    __slots__ = ("items", "running", "__weakref__")

    def __init__(self) -> None:
        self.items: list[tuple[str, asyncio.Future]] = []
        self.running = False



class EmbeddingCache:
    """Bounded LRU of text -> embedding (per process)."""

    def __init__(self, max_entries: int = EMBEDDING_CACHE_ENTRIES):
        self.max_entries = max_entries
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, text: str) -> np.ndarray | None:
        vector = self._data.get(text)
        if vector is None:
            self.misses += 1
            return None
        self._data.move_to_end(text)
        self.hits += 1
        return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        self._data[text] = vector
        self._data.move_to_end(text)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)



class PromptEmbedder:
    """The process-wide embedding service of the routing policies (see :func:`prompt_embedder`)."""

    def __init__(self, encoder_factory: Callable[[], object] | None = None, *,
                 cache_entries: int = EMBEDDING_CACHE_ENTRIES, max_batch: int = 32,
                 triton: TritonEmbeddingClient | None = None, on_unavailable: str = "local",
                 retry_seconds: float = 2.0, batch_in_gateway: bool = True):
        """:param triton: compute embeddings with Triton's embedder (None: in process).
        :param on_unavailable: ``local`` (compute in process) or ``fail`` (raise) when Triton cannot.
        :param retry_seconds: after a Triton failure, how long to go straight to ``on_unavailable``.
        :param batch_in_gateway: False: each prompt its own Triton request (Triton's dynamic batcher
            merges them) instead of the batcher's one request per batch."""
        if on_unavailable not in ("local", "fail"):
            raise ValueError(f"on_unavailable: 'local' or 'fail', not {on_unavailable!r}")
        if encoder_factory is None:
            from extproc.embeddings.encoder import get_encoder

            encoder_factory = get_encoder
        self._factory = encoder_factory
        self._encoder = None
        self._encoder_lock = threading.Lock()
        self.cache = EmbeddingCache(cache_entries)
        self.triton = triton
        self.on_unavailable = on_unavailable
        self.retry_seconds = retry_seconds
        self.batch_in_gateway = batch_in_gateway
        self._triton_down_until = 0.0
        self.settings_key: tuple | None = None  #: the configuration it was built from (configure_prompt_embedder)
        self.runtime: str | None = None  #: the local encoder's runtime when configured (None: get_encoder's default)
        self.texts = {LOCAL: 0, TRITON: 0, LOCAL_FALLBACK: 0}  #: texts embedded, by where
        self.triton_failures = 0
        self.batcher = EmbeddingBatcher(self._encode, max_batch=max_batch,
                                        encode_async=self._encode_remote if triton is not None else None)

    @property
    def backend(self) -> str:
        """``local`` or ``triton``: where this embedder computes."""
        return TRITON if self.triton is not None else LOCAL

    async def _encode_remote(self, texts: list[str]) -> tuple[np.ndarray, str]:
        """A batch through Triton; when it cannot answer, ``on_unavailable`` decides."""
        now = time.monotonic()
        if now >= self._triton_down_until:
            try:
                vectors = await self.triton.embed(texts)
                self.texts[TRITON] += len(texts)
                return vectors, TRITON
            except EmbedderUnavailable as exc:
                self.triton_failures += 1
                self._triton_down_until = time.monotonic() + self.retry_seconds
                log.warning("embeddings: Triton's embedder did not answer (%s); %s for %.0fs, then retrying",
                            exc, "computing in process" if self.on_unavailable == "local" else "failing the "
                            "policies that ask", self.retry_seconds)
                failure = exc
        else:
            failure = EmbedderUnavailable(f"{self.triton!r} failed less than {self.retry_seconds:g}s ago")
        if self.on_unavailable == "fail":
            raise failure
        return await self._local_batch(texts), LOCAL_FALLBACK

    async def _local_batch(self, texts: list[str]) -> np.ndarray:
        vectors = await asyncio.get_running_loop().run_in_executor(self.batcher._pool(), self._encode, texts)
        self.texts[LOCAL_FALLBACK if self.triton is not None else LOCAL] += len(texts)
        return vectors

    @property
    def encoder(self):
        """The sentence encoder (loaded on first use)."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    self._encoder = self._factory()
        return self._encoder

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self.encoder.encode(texts), dtype=np.float32)
        if self.triton is None:
            self.texts[LOCAL] += len(texts)
        return vectors

    def load(self) -> None:
        """Load the local encoder now (start-up) rather than on the first request: always for the
        local backend, and for Triton when a failure falls back to it (``on_unavailable: local``)."""
        if self.triton is None or self.on_unavailable == "local":
            _ = self.encoder

    async def embed_text(self, text: str) -> tuple[np.ndarray, bool]:
        """``(embedding, computed)``: ``computed`` is False when the cache answered."""
        vector, source = await self.embed_text_traced(text)
        return vector, source is not None

    async def embed_text_traced(self, text: str) -> tuple[np.ndarray, str | None]:
        """``(embedding, source)``: where it was computed (:data:`LOCAL`, :data:`TRITON`,
        :data:`LOCAL_FALLBACK`), None when the cache answered."""
        vector = self.cache.get(text)
        if vector is not None:
            return vector, None
        if self.triton is not None and not self.batch_in_gateway:
            vectors, source = await self._encode_remote([text])
            vector = vectors[0]
        else:
            vector, source = await self.batcher.encode_traced(text)
        self.cache.put(text, vector)
        return vector, source

    async def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of many texts (start-up work; not cached). With Triton, computed there when it
        answers, else in process whatever ``on_unavailable`` says (see the module docstring)."""
        texts = [clip_text(t) for t in texts]
        if self.triton is None or not texts:
            return await self.batcher.encode_many(texts)
        try:
            vectors = await self.triton.embed(texts)
            self.texts[TRITON] += len(texts)
            return vectors
        except EmbedderUnavailable as exc:
            log.warning("embeddings: Triton's embedder did not answer for start-up work (%s); "
                        "computing %d text(s) in process", exc, len(texts))
            return await self._local_batch(texts)

    def close(self) -> None:
        """Stop the batcher's thread and close Triton connections."""
        self.batcher.close()
        if self.triton is not None:
            self.triton.close()


_shared: PromptEmbedder | None = None



_shared_lock = threading.Lock()



def configure_prompt_embedder(settings: "EmbeddingsConfig | None") -> PromptEmbedder:
    """Make the process-wide embedder follow ``settings`` (the ``embeddings:`` block; None: local).

    The same settings keep the embedder there is (its cache, its connections); others replace it.
    """
    global _shared
    key = None if settings is None else tuple(sorted(settings.model_dump().items()))
    local = key is None or settings.backend == LOCAL
    runtime = None if settings is None or settings.runtime == "auto" else settings.runtime
    with _shared_lock:
        if _shared is not None and (_shared.settings_key == key or (
                local and runtime is None and _shared.triton is None and _shared.runtime is None)):
            return _shared  # the same settings; or local on the default runtime, as the one there is
        old = _shared
        factory = None if runtime is None else functools.partial(get_encoder, runtime)
        if local:
            _shared = PromptEmbedder(factory)
        else:
            client = TritonEmbeddingClient(settings.triton_url, model=settings.triton_model,
                                           timeout=settings.timeout_seconds)
            _shared = PromptEmbedder(factory, triton=client, on_unavailable=settings.on_unavailable,
                                     retry_seconds=settings.retry_seconds, batch_in_gateway=settings.batch_in_gateway)
        _shared.runtime = runtime
        _shared.settings_key = key
    if old is not None:
        old.close()
    return _shared


def prompt_embedder() -> PromptEmbedder:
    """The process-wide :class:`PromptEmbedder` (local MiniLM, loaded on first use, unless
    :func:`configure_prompt_embedder` chose otherwise)."""
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                _shared = PromptEmbedder()
    return _shared



async def prompt_embedding(ctx: "RequestContext", embedder: PromptEmbedder | None = None) -> np.ndarray:
    """The embedding of :func:`route_text` for this request, computed at most once per request.

    Counts a computed embedding in ``ctx.embedding_calls`` and where it was computed in
    ``ctx.embedding_sources`` (a cache hit is free).
    """
    held = ctx.plugin_state.get(_EMBEDDING_KEY)
    if held is not None:
        return held
    embedder = embedder or prompt_embedder()
    vector, source = await embedder.embed_text_traced(route_text(ctx))
    if source is not None:
        ctx.embedding_calls += 1
        ctx.embedding_sources.append(source)
    ctx.plugin_state[_EMBEDDING_KEY] = vector
    return vector
