"""Retrieval discipline: attached documents are chunked, ranked against the question, and only the
best chunks that fit the document-token cap are sent, in their original order.

**The convention.** A chat request may carry a top-level extension field ``documents`` (the
OpenAI SDKs send it with ``extra_body={"documents": [...]}``): a list of strings, or of objects
``{"id": "...", "title": "...", "text": "..."}`` (``text`` required, the rest optional)::

    {"model": "auto", "messages": [{"role": "user", "content": "When was the bridge opened?"}],
     "documents": [{"id": "bridge.md", "text": "..."}, "another document ..."]}

The gateway removes the field, splits each document into chunks of about ``chunk_tokens`` tokens
(at paragraph boundaries when it can), and when they do not all fit ``max_document_tokens``
ranks them by cosine similarity between their MiniLM embedding and the question's (the last user
message; :mod:`extproc.embeddings.encoder`). It keeps the best-ranked chunks that fit, puts them back in
document order, and inserts them as one system message just before the last user message::

    Documents (the most relevant excerpts; [id #n] names a chunk):

    [bridge.md #2]
    ...

Chunk embeddings are cached in the store by the SHA-256 of their text (shared by every worker and
gateway on Redis), so a document sent again costs no embedding. What was left out goes to
``ctx.tokens_cut``; ``x-extproc-documents: <kept>/<total> chunks`` and
``x-extproc-document-chunks`` (the ids of the kept chunks) say what was sent.

Bad input (400, ``param`` naming it): ``documents`` not a list, an item not a string or an object
with a string ``text``, more than ``max_documents`` documents or ``max_chunks`` chunks, or
``documents`` on ``/v1/completions``. The store unreachable only costs the cache (embeddings are
computed); the encoder failing is a plugin failure (its ``on_error``).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from extproc.formats import tokens
from extproc.framework.hookspecs import hookimpl
from extproc.formats.openai import ChatMessage, OpenAIError, invalid_request
from extproc.state.store import StoreUnavailable

NAME = "retrieval"
FIELD = "documents"
_PARAGRAPHS = re.compile(r"\n\s*\n")


@dataclass(slots=True)
class Chunk:
    doc: int
    index: int
    label: str
    text: str
    tokens: int
    score: float = 0.0


def chunk_document(text: str, chunk_tokens: int, encoding: str) -> list[tuple[str, int]]:
    """``text`` split into pieces of at most ``chunk_tokens`` tokens, at paragraph boundaries when possible."""
    enc = tokens.get_encoding(encoding)
    out: list[tuple[str, int]] = []
    current: list[str] = []
    current_tokens = 0
    for para in (p.strip() for p in _PARAGRAPHS.split(text)):
        if not para:
            continue
        ids = enc.encode_ordinary(para)
        if len(ids) > chunk_tokens:  # a long paragraph: close the current chunk, then cut it in windows
            if current:
                out.append(("\n\n".join(current), current_tokens))
                current, current_tokens = [], 0
            for start in range(0, len(ids), chunk_tokens):
                piece = ids[start:start + chunk_tokens]
                out.append((enc.decode(piece), len(piece)))
            continue
        extra = len(ids) + (2 if current else 0)
        if current and current_tokens + extra > chunk_tokens:
            out.append(("\n\n".join(current), current_tokens))
            current, current_tokens = [], 0
            extra = len(ids)
        current.append(para)
        current_tokens += extra
    if current:
        out.append(("\n\n".join(current), current_tokens))
    return out


class Retrieval:
    """Chunk attached documents, rank chunks by similarity to the question, keep the best that fit."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        max_document_tokens: int = Field(1500, gt=0, description="the documents' share of the prompt")
        chunk_tokens: int = Field(128, ge=16, le=512)
        max_documents: int = Field(64, gt=0)
        max_chunks: int = Field(512, gt=0)
        tokenizer: str = "cl100k_base"
        cache_ttl_seconds: float = Field(7 * 86400, gt=0)
        preamble: str = "Documents (the most relevant excerpts; [id #n] names a chunk):"

    def __init__(self, settings: "Retrieval.Settings"):
        self.settings = settings
        self.store = None
        self.encoder = None
        self._encoding: asyncio.Semaphore | None = None

    @hookimpl
    async def extproc_startup(self, gateway):
        from extproc.embeddings.encoder import get_encoder

        self.store = gateway.store
        self._encoding = asyncio.Semaphore(2)  # bounded: the encoder is CPU-bound
        self.encoder = await asyncio.to_thread(get_encoder)  # load the weights before traffic
        tokens.get_encoding(self.settings.tokenizer)

    # parsing -----------------------------------------------------------------------------------
    def _documents(self, req) -> list[tuple[str, str]] | None:
        raw = req.raw.get(FIELD)
        if raw is None:
            return None
        if req.messages is None:
            raise OpenAIError(400, f"Unsupported parameter: '{FIELD}': only /v1/chat/completions takes documents.",
                              param=FIELD, code="unsupported_parameter")
        if not isinstance(raw, list):
            raise invalid_request(f"Invalid type for '{FIELD}': expected an array of documents.",
                                  param=FIELD, code="invalid_type")
        if len(raw) > self.settings.max_documents:
            raise invalid_request(f"Too many documents: {len(raw)}; at most {self.settings.max_documents}.",
                                  param=FIELD, code="array_above_max_length")
        docs = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                docs.append((f"doc{i}", item))
                continue
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise invalid_request(f"Invalid '{FIELD}[{i}]': expected a string or an object with a string 'text'.",
                                      param=f"{FIELD}[{i}]", code="invalid_type")
            label = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else f"doc{i}"
            title = item.get("title")
            docs.append((label, f"{title}\n\n{item['text']}" if isinstance(title, str) and title else item["text"]))
        return docs

    # the hook ----------------------------------------------------------------------------------
    @hookimpl
    async def extproc_request_parsed(self, ctx):
        req = ctx.request
        if FIELD not in req.raw:
            return None
        await self._apply(ctx, req)  # timed by the plugin manager (ctx.timings_ms["plugin:retrieval"])
        return None

    async def _apply(self, ctx, req) -> None:
        s = self.settings
        docs = self._documents(req)
        req.raw.pop(FIELD, None)
        if not docs:
            return
        chunks: list[Chunk] = []
        for d, (label, text) in enumerate(docs):
            for n, (piece, count) in enumerate(chunk_document(text, s.chunk_tokens, s.tokenizer)):
                chunks.append(Chunk(d, n, f"{label} #{n}", piece, count))
                if len(chunks) > s.max_chunks:
                    raise invalid_request(f"The documents make more than {s.max_chunks} chunks; send fewer.",
                                          param=FIELD, code="array_above_max_length")
        if not chunks:
            return
        total = sum(c.tokens for c in chunks)
        if total <= s.max_document_tokens:
            kept = chunks
        else:
            question = self._question(req)
            vectors = await self._embed(ctx, [question] + [c.text for c in chunks])
            scores = vectors[1:] @ vectors[0]
            for c, score in zip(chunks, scores):
                c.score = float(score)
            kept, budget = [], s.max_document_tokens
            for c in sorted(chunks, key=lambda c: -c.score):
                if c.tokens <= budget:
                    kept.append(c)
                    budget -= c.tokens
            kept.sort(key=lambda c: (c.doc, c.index))
        kept_tokens = sum(c.tokens for c in kept)
        ctx.tokens_cut += total - kept_tokens
        body = "\n\n".join(f"[{c.label}]\n{c.text}" for c in kept)
        message = ChatMessage(role="system", content=f"{s.preamble}\n\n{body}" if kept else s.preamble)
        last_user = max((i for i, m in enumerate(req.messages) if m.role == "user"), default=len(req.messages))
        req.messages.insert(last_user, message)
        ctx.prompt_tokens_estimate = None  # the prompt changed; later policies count again
        ctx.response_headers["x-extproc-documents"] = f"{len(kept)}/{len(chunks)} chunks"
        ids = ",".join(c.label.replace(" ", "") for c in kept[:32])
        ctx.response_headers["x-extproc-document-chunks"] = ids + (",..." if len(kept) > 32 else "")
        if total != kept_tokens:
            ctx.response_headers["x-extproc-tokens-cut"] = str(ctx.tokens_cut)
        ctx.route_trace.append(f"{NAME}: kept {len(kept)} of {len(chunks)} chunks ({kept_tokens} of {total} tokens)")

    @staticmethod
    def _question(req) -> str:
        for m in reversed(req.messages):
            if m.role == "user" and m.text:
                return m.text
        return " ".join(m.text for m in req.messages)

    async def _embed(self, ctx, texts: list[str]) -> np.ndarray:
        """Unit vectors for ``texts``: from the store's cache by content hash, the rest computed."""
        keys = ["emb:minilm:" + hashlib.sha256(t.encode()).hexdigest() for t in texts]
        try:
            cached = await self.store.get_many(keys)
        except StoreUnavailable:
            cached = [None] * len(texts)
        out = np.empty((len(texts), self.encoder.dim), dtype=np.float32)
        missing = []
        for i, raw in enumerate(cached):
            if raw is not None and len(raw) == self.encoder.dim * 4:
                out[i] = np.frombuffer(raw, dtype=np.float32)
            else:
                missing.append(i)
        if missing:
            async with self._encoding:
                vectors = await asyncio.to_thread(self.encoder.encode, [texts[i] for i in missing])
            ctx.embedding_calls += len(missing)
            for i, v in zip(missing, vectors):
                out[i] = v
                try:
                    await self.store.set(keys[i], np.asarray(v, dtype=np.float32).tobytes(),
                                         ttl=self.settings.cache_ttl_seconds)
                except StoreUnavailable:
                    break
        return out
