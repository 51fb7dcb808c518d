"""Idempotency keys: replay within the window whatever the temperature, 422 for another body, 409 while running."""

from __future__ import annotations

import asyncio
import json

from extproc.wire.decisions import Continue, Reply
from extproc_plugins.caching.idempotency import Idempotency

from .cache_helpers import chat_body, content, harness
from .test_coalescing import finish, start

KEY = {"idempotency-key": "order-42"}


async def test_retry_with_the_same_key_and_body_gets_the_stored_answer_whatever_the_temperature():
    async with harness(Idempotency) as gw:
        first = await gw.send(chat_body("write a poem", temperature=1.3), headers=KEY, answer="roses are red")
        retry = await gw.send(chat_body("write a poem", temperature=1.3), headers=KEY, answer="SHOULD NOT BE SEEN")
        other_key = await gw.send(chat_body("write a poem", temperature=1.3), headers={"idempotency-key": "k2"},
                                  answer="violets")
        no_key = await gw.send(chat_body("write a poem", temperature=1.3), answer="tulips")
    assert not first.replied and first.ctx.cache_lookups == [("idempotency", "new")]
    assert retry.replied and content(retry) == "roses are red"
    assert retry.json()["id"] == first.json()["id"] and retry.json()["created"] == first.json()["created"]
    assert retry.headers["x-extproc-cache"] == "idempotent" and retry.ctx.cache_status == "idempotent"
    assert retry.ctx.cost_saved_usd > 0  # priced at the tier that answered the first time
    assert content(other_key) == "violets" and content(no_key) == "tulips"


async def test_streamed_retry_is_replayed_as_the_same_stream():
    async with harness(Idempotency) as gw:
        first = await gw.send(chat_body("poem", stream=True, temperature=1), headers=KEY, answer="a b c")
        retry = await gw.send(chat_body("poem", stream=True, temperature=1), headers=KEY)
    assert retry.replied and retry.headers["content-type"] == "text/event-stream"
    assert content(retry) == content(first) == "a b c"
    assert json.loads(retry.events()[0])["id"] == json.loads(first.events()[0])["id"]


async def test_same_key_different_body_is_a_422():
    async with harness(Idempotency) as gw:
        await gw.send(chat_body("poem"), headers=KEY)
        for body in (chat_body("another poem"), chat_body("poem", temperature=0.5), chat_body("poem", stream=True)):
            result = await gw.send(body, headers=KEY)
            assert result.status == 422
            err = result.json()["error"]
            assert err["code"] == "idempotency_key_reused" and err["type"] == "invalid_request_error"


async def test_key_order_in_the_body_does_not_make_it_different():
    async with harness(Idempotency) as gw:
        await gw.send(b'{"model":"auto","temperature":1,"messages":[{"role":"user","content":"x"}]}', headers=KEY)
        retry = await gw.send(b'{"messages":[{"content":"x","role":"user"}],"temperature":1,"model":"auto"}',
                              headers=KEY)
    assert retry.replied and retry.status == 200


async def test_malformed_keys_are_a_400():
    async with harness(Idempotency) as gw:
        for bad in ("", "x" * 256, "caf\u00e9"):
            result = await gw.send(chat_body("q"), headers={"idempotency-key": bad})
            assert result.status == 400 and result.json()["error"]["code"] == "invalid_idempotency_key"


async def test_a_retry_while_the_first_runs_waits_for_it_then_gets_its_answer():
    async with harness(Idempotency) as gw:
        first, d = await start(gw, chat_body("slow", temperature=1), headers=KEY)
        assert isinstance(d, Continue)
        retry = asyncio.create_task(start(gw, chat_body("slow", temperature=1), headers=KEY))
        await asyncio.sleep(0.1)
        assert not retry.done()
        await finish(first, "done at last")
        _, reply = await retry
    assert isinstance(reply, Reply) and json.loads(reply.body)["choices"][0]["message"]["content"] == "done at last"


async def test_a_retry_while_the_first_runs_too_long_is_a_409():
    async with harness(Idempotency, {"wait_seconds": 0.1}) as gw:
        first, _ = await start(gw, chat_body("slow"), headers=KEY)
        _, reply = await start(gw, chat_body("slow"), headers=KEY)
        await finish(first)
    assert isinstance(reply, Reply) and reply.status == 409
    assert json.loads(reply.body)["error"]["code"] == "idempotency_key_in_use"


async def test_a_failed_first_request_releases_the_key():
    async with harness(Idempotency) as gw:
        failed = await gw.send(chat_body("q"), headers=KEY, upstream_status=503, upstream_chunks=[b'{"error":"x"}'])
        aborted = await gw.send(chat_body("q", stream=True), headers={"idempotency-key": "k2"}, answer="a b c d",
                                abort_after_chunks=1)
        retry = await gw.send(chat_body("q"), headers=KEY, answer="worked")
        retry2 = await gw.send(chat_body("q", stream=True), headers={"idempotency-key": "k2"}, answer="worked too")
    assert failed.status == 503 and aborted.ctx.outcome == "aborted"
    assert not retry.replied and content(retry) == "worked"
    assert not retry2.replied


async def test_keys_are_shared_across_gateways_through_redis(redis_url):
    async with harness(Idempotency, redis_url=redis_url, prefix="idem-x:") as one, \
            harness(Idempotency, redis_url=redis_url, prefix="idem-x:") as two:
        await one.send(chat_body("q", temperature=1), headers=KEY, answer="from one")
        retry = await two.send(chat_body("q", temperature=1), headers=KEY)
    assert retry.replied and content(retry) == "from one"


async def test_redis_down_lets_requests_through():
    async with harness(Idempotency, redis_url="redis://127.0.0.1:1/0") as gw:
        first = await gw.send(chat_body("q"), headers=KEY, answer="one")
        second = await gw.send(chat_body("q"), headers=KEY, answer="two")
    assert first.status == second.status == 200 and content(second) == "two"
    assert first.ctx.cache_lookups == [("idempotency", "error")]


async def test_the_same_key_from_another_tenant_is_another_key():
    from extproc.framework.testing import GatewayHarness

    from .cache_helpers import TenantFromHeader, config

    async with GatewayHarness(Idempotency, TenantFromHeader, config=config()) as gw:
        await gw.send(chat_body("q"), headers={**KEY, "x-test-tenant": "A"}, answer="A's")
        b = await gw.send(chat_body("different body"), headers={**KEY, "x-test-tenant": "B"}, answer="B's")
        b2 = await gw.send(chat_body("different body"), headers={**KEY, "x-test-tenant": "B"})
    assert b.status == 200 and not b.replied and content(b2) == "B's"
