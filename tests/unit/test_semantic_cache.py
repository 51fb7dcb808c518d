"""The semantic cache through the real lifecycle, with the real MiniLM encoder."""

from __future__ import annotations

import pytest

from extproc.framework.testing import GatewayHarness
from extproc_plugins.caching.semantic_cache import SemanticCache

from .cache_helpers import TenantFromHeader, chat_body, config, content, harness, plugin_of


async def test_paraphrase_hits_with_its_similarity_near_misses_do_not():
    async with harness(SemanticCache) as gw:
        await gw.send(chat_body("What is the capital of France?"), answer="Paris.")
        para = await gw.send(chat_body("Which city is the capital of France?"), answer="WRONG")
        other_city = await gw.send(chat_body("What is the capital of Germany?"), answer="Berlin.")
        negated = await gw.send(chat_body("What is not the capital of France?"), answer="Lyon.")
    assert para.replied and content(para) == "Paris."
    assert para.headers["x-extproc-cache"] == "semantic_hit"
    assert 0.9 <= float(para.headers["x-extproc-cache-similarity"]) < 1.0
    assert para.ctx.cache_lookups == [("semantic", "hit")] and para.ctx.embedding_calls == 1
    assert para.json()["usage"]["prompt_tokens"] != 5  # this request's prompt, counted with the tier tokenizer
    assert not other_city.replied and content(other_city) == "Berlin."
    assert not negated.replied


async def test_guard_rejection_is_recorded():
    async with harness(SemanticCache) as gw:
        await gw.send(chat_body("Give me three tips for studying."), answer="1 2 3")
        five = await gw.send(chat_body("Give me five tips for studying."), answer="1 2 3 4 5")
    assert not five.replied and five.ctx.cache_lookups == [("semantic", "guard_rejected")]


async def test_streamed_paraphrase_is_replayed_as_sse():
    async with harness(SemanticCache) as gw:
        await gw.send(chat_body("How do I reverse a list in Python?"), answer="use reversed")
        hit = await gw.send(chat_body("What's the way to reverse a Python list?", stream=True))
    assert hit.replied and hit.headers["content-type"] == "text/event-stream"
    assert content(hit) == "use reversed" and hit.events()[-1] == "[DONE]"


@pytest.mark.parametrize("change", [
    {"system": "Answer in French."},  # another system prompt
    {"max_tokens": 7},  # other sampling settings
    {"model": "large"},  # another tier
])
async def test_scope_a_different_system_prompt_tier_or_sampling_never_matches(change):
    async with harness(SemanticCache) as gw:
        await gw.send(chat_body("What is the capital of France?"), answer="Paris.")
        body = chat_body("Which city is the capital of France?", system=change.get("system"))
        if "max_tokens" in change:
            body["max_tokens"] = change["max_tokens"]
        if "model" in change:
            body["model"] = change["model"]
        other = await gw.send(body, answer="fresh")
    assert not other.replied


async def test_tenant_scope():
    async with GatewayHarness(SemanticCache, TenantFromHeader, config=config()) as gw:
        await gw.send(chat_body("What is the capital of France?"), headers={"x-test-tenant": "A"}, answer="A")
        b = await gw.send(chat_body("Which city is the capital of France?"), headers={"x-test-tenant": "B"})
        a = await gw.send(chat_body("Which city is the capital of France?"), headers={"x-test-tenant": "A"})
    assert not b.replied and a.replied and content(a) == "A"


async def test_non_deterministic_and_no_cache_requests():
    async with harness(SemanticCache) as gw:
        await gw.send(chat_body("What is the capital of France?", temperature=0.8), answer="x")
        hot = await gw.send(chat_body("What is the capital of France?", temperature=0.8))
        await gw.send(chat_body("Why is the sky blue?"), answer="Rayleigh", headers={"cache-control": "no-cache"})
        stored_anyway = await gw.send(chat_body("Explain why the sky appears blue."))
    assert not hot.replied and hot.ctx.cache_lookups == [("semantic", "skip")]
    assert stored_anyway.replied and content(stored_anyway) == "Rayleigh"


async def test_exact_duplicate_is_not_stored_twice():
    async with harness(SemanticCache, {"dedupe_above": 0.99}) as gw:
        await gw.send(chat_body("Why is the sky blue?"), answer="one", headers={"cache-control": "no-cache"})
        await gw.send(chat_body("Why is the sky blue?"), answer="two", headers={"cache-control": "no-cache"})
        index = plugin_of(gw, "SemanticCache").index
    assert index.total == 1


async def test_shared_across_gateways_through_redis(redis_url):
    async with harness(SemanticCache, redis_url=redis_url, prefix="shared-sem:") as one, \
            harness(SemanticCache, redis_url=redis_url, prefix="shared-sem:") as two:
        await one.send(chat_body("Who wrote Pride and Prejudice?"), answer="Jane Austen.")
        hit = await two.send(chat_body("Who is the author of Pride and Prejudice?"))
    assert hit.replied and content(hit) == "Jane Austen." and hit.headers["x-extproc-cache"] == "semantic_hit"


async def test_redis_down_degrades_to_no_semantic_cache():
    async with harness(SemanticCache, redis_url="redis://127.0.0.1:1/0") as gw:
        first = await gw.send(chat_body("What is the capital of France?"), answer="Paris")
        second = await gw.send(chat_body("Which city is the capital of France?"), answer="Paris again")
    assert first.status == second.status == 200 and not second.replied
    assert first.ctx.cache_lookups == [("semantic", "error")]
    assert second.ctx.cache_lookups == [("semantic", "unavailable")]


async def test_expired_answer_drops_its_vector():
    async with harness(SemanticCache) as gw:
        await gw.send(chat_body("What is the capital of France?"), answer="Paris", headers={"x-cache-ttl": "5"})
        cache = plugin_of(gw, "SemanticCache")
        for key in [k for k in cache.store._data if k.startswith("sa:")]:
            await cache.store.delete(key)  # the answer went (evicted) while its vector stayed
        miss = await gw.send(chat_body("Which city is the capital of France?"), answer="x")
    assert not miss.replied and cache.index.total == 1  # the old vector removed, the new one added


async def test_encoder_unavailable_with_fail_open_disables_the_policy(monkeypatch):
    import extproc.embeddings.encoder as emb
    from extproc.embeddings import prompt as prompts

    def missing():
        raise emb.ModelNotFoundError("no weights here")

    monkeypatch.setattr(prompts, "prompt_embedder", lambda: prompts.PromptEmbedder(missing))
    async with harness(SemanticCache, on_error="fail_open") as gw:
        result = await gw.send(chat_body("What is the capital of France?"), answer="Paris")
    assert result.status == 200 and result.ctx.cache_lookups == [("semantic", "unavailable")]
    with pytest.raises(Exception):
        async with harness(SemanticCache, on_error="fail_closed"):
            pass


async def test_completions_prompts_are_matched_by_meaning():
    base = {"model": "auto", "temperature": 0}
    async with harness(SemanticCache) as gw:
        await gw.send({**base, "prompt": "What is the capital of France?"}, path="/v1/completions", answer="Paris")
        hit = await gw.send({**base, "prompt": "Which city is the capital of France?"}, path="/v1/completions")
    assert hit.replied and hit.json()["object"] == "text_completion" and content(hit) == "Paris"


async def test_the_routers_embedding_of_the_same_turn_is_reused_not_computed_again():
    from extproc.embeddings import prompt as prompts
    from extproc.framework.hookspecs import hookimpl

    class Router:  # stands for semantic_routes / learned_router, which embed the last user turn
        @hookimpl
        async def extproc_request_parsed(self, ctx):
            await prompts.prompt_embedding(ctx)

    async with GatewayHarness(Router, SemanticCache, config=config()) as gw:
        first = await gw.send(chat_body("What is the tallest building in Europe today?"), answer="x")
        hit = await gw.send(chat_body("Which building is the tallest in Europe today?"))
    assert first.ctx.embedding_calls == 1 and hit.replied and hit.ctx.embedding_calls == 1


async def test_reuse_embeddings_off_encodes_every_lookup():
    async with harness(SemanticCache, {"reuse_embeddings": False}) as gw:
        await gw.send(chat_body("What is the capital of France?"), answer="Paris")
        again = await gw.send(chat_body("Which city is the capital of France?"))
        again2 = await gw.send(chat_body("Which city is the capital of France?"))
    assert again.ctx.embedding_calls == again2.ctx.embedding_calls == 1 and again2.replied
