"""Retrieval discipline: chunking, ranking by real MiniLM similarity, the cap, order, cache, bad input."""

from __future__ import annotations

import pytest

from extproc.formats import tokens
from extproc.framework.testing import GatewayHarness
from extproc_plugins.context.retrieval import chunk_document

from .budget_helpers import config_with

FILLER = [
    "The quarterly marketing report covers social media campaigns and their reach among teenagers.",
    "Our cafeteria menu changes every Tuesday and includes vegetarian pasta and lentil soup.",
    "The office printer on the third floor needs new toner cartridges before the audit.",
    "Employee parking permits are renewed each January at the front desk in building C.",
    "The holiday party will take place in the main hall with a live jazz band this year.",
    "Desk booking uses the new app; reserve a seat at least one day in advance.",
]
ANSWER_PARA = ("The Golden Gate Bridge in San Francisco was opened to traffic in May 1937 after four "
               "years of construction, and its main span is 1,280 metres long.")


def retrieval(**settings):
    return config_with({"name": "retrieval", "settings": {"chunk_tokens": 40, "max_document_tokens": 80, **settings}})


def body(documents, question="When was the Golden Gate Bridge opened?"):
    return {"model": "auto", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": question}], "documents": documents}


def test_chunking_respects_paragraphs_and_the_size():
    text = "\n\n".join(FILLER + [ANSWER_PARA]) + "\n\n" + " ".join(["long"] * 300)
    chunks = chunk_document(text, 40, "cl100k_base")
    assert all(n <= 40 for _, n in chunks)
    assert any(c == ANSWER_PARA for c, _ in chunks)  # a paragraph that fits stays whole
    assert sum(n for _, n in chunks[-8:]) >= 290  # the long paragraph is cut in windows


async def test_best_chunks_kept_in_original_order_within_the_cap():
    docs = [{"id": "office", "text": "\n\n".join(FILLER[:3])},
            {"id": "bridge", "title": "Bridges", "text": "\n\n".join(FILLER[3:] + [ANSWER_PARA])}]
    async with GatewayHarness(config=retrieval()) as gw:
        result = await gw.send(body(docs))
    assert result.status == 200
    msgs = result.ctx.request.messages
    assert [m.role for m in msgs] == ["system", "system", "user"]  # documents just before the question
    context = msgs[1].content
    assert "Golden Gate Bridge" in context and "[bridge #" in context
    kept = result.headers["x-extproc-document-chunks"].split(",")
    assert any(k.startswith("bridge#") for k in kept)
    assert kept == sorted(kept, key=lambda k: (k.split("#")[0] != "office", int(k.split("#")[1])))  # doc order
    doc_part = context.split("\n\n", 1)[1]
    assert tokens.count_text(doc_part) <= 80 + 10 * len(kept)  # chunk texts within the cap (+ labels)
    assert result.ctx.tokens_cut > 0 and result.headers["x-extproc-documents"].endswith(" chunks")
    assert "documents" not in result.ctx.request.raw
    assert "Golden Gate" in result.upstream_json["text_input"]
    assert result.ctx.embedding_calls >= 2


async def test_embeddings_are_cached_by_content_hash():
    docs = ["\n\n".join(FILLER + [ANSWER_PARA])]
    async with GatewayHarness(config=retrieval()) as gw:
        first = await gw.send(body(docs))
        second = await gw.send(body(docs))
        third = await gw.send(body(docs, question="Where can I park my car?"))
    assert first.ctx.embedding_calls >= 3
    assert second.ctx.embedding_calls == 0  # question and chunks: all from the store
    assert third.ctx.embedding_calls == 1  # only the new question
    assert "parking" in third.ctx.request.messages[1].content


async def test_everything_fits_no_embedding_needed():
    async with GatewayHarness(config=retrieval(max_document_tokens=10_000)) as gw:
        result = await gw.send(body(["short document one", {"text": "short two"}]))
    assert result.ctx.embedding_calls == 0 and result.headers["x-extproc-documents"] == "2/2 chunks"
    assert "short document one" in result.ctx.request.messages[1].content


@pytest.mark.parametrize("documents, param, code", [
    ("not a list", "documents", "invalid_type"),
    ([{"title": "no text"}], "documents[0]", "invalid_type"),
    ([42], "documents[0]", "invalid_type"),
    (["x"] * 65, "documents", "array_above_max_length"),
])
async def test_bad_documents_are_400(documents, param, code):
    async with GatewayHarness(config=retrieval()) as gw:
        result = await gw.send(body(documents))
    assert result.status == 400
    err = result.json()["error"]
    assert err["param"] == param and err["code"] == code


async def test_documents_on_completions_are_unsupported():
    async with GatewayHarness(config=retrieval()) as gw:
        result = await gw.send({"model": "auto", "prompt": "q", "documents": ["d"]}, path="/v1/completions")
    assert result.status == 400 and result.json()["error"]["code"] == "unsupported_parameter"


async def test_too_many_chunks_is_400():
    async with GatewayHarness(config=retrieval(max_chunks=2)) as gw:
        result = await gw.send(body(["\n\n".join(FILLER)]))
    assert result.status == 400 and result.json()["error"]["code"] == "array_above_max_length"
