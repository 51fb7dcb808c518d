"""Request normalisation and fingerprints: what changes a cache key and what does not."""

from __future__ import annotations

import json

import pytest

from extproc_plugins.caching.cache_keys import (Normalization, body_hash, canonical_request, deterministic, exact_key_parts,
                                fingerprint, normalize_text, semantic_parts)
from extproc.formats.openai import parse_request


def req(body: dict, endpoint="chat"):
    return parse_request(endpoint, json.dumps(body).encode())


def key(body: dict, *, tenant="t", tier="small", model="llm-small", **kw) -> str:
    return fingerprint(exact_key_parts(req(body), tenant=tenant, tier=tier, model=model, **kw))


BASE = {"model": "auto", "temperature": 0, "messages": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Capital of France?"}]}


def variant(**changes) -> dict:
    body = json.loads(json.dumps(BASE))
    body.update(changes)
    return body


def test_normalize_text_nfc_whitespace_and_optional_steps():
    decomposed = "Cafe\u0301  au\n\tlait "
    assert normalize_text(decomposed) == "Caf\u00e9 au lait"
    assert normalize_text("A  B", Normalization(collapse_whitespace=False)) == "A  B"
    assert normalize_text("\ufb01ne", Normalization(unicode_form="NFKC")) == "fine"
    assert normalize_text("Hello", Normalization(lowercase=True)) == "hello"
    assert normalize_text("Hello") == "Hello"


@pytest.mark.parametrize("same", [
    # JSON key order and spacing
    json.loads('{"temperature": 0, "messages": [{"content": "Be brief.", "role": "system"}, '
               '{"content": "Capital of France?", "role": "user"}], "model": "auto"}'),
    # whitespace and Unicode composition in the text
    variant(messages=[{"role": "system", "content": "Be  brief. "},
                      {"role": "user", "content": "Capital\u00a0of France?\n"}]),
    # text-only content parts == the same text as a string
    variant(messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                      {"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                                   {"type": "text", "text": "France?"}]}]),
    # streaming, stream options, user, metadata and the model *name* do not change the answer
    variant(stream=True, stream_options={"include_usage": True}),
    variant(user="someone", metadata={"a": 1}),
    variant(model="llm-small"),
    # max_tokens resolved to the tier default
    variant(max_tokens=64),
])
def test_key_ignores_what_does_not_change_the_answer(same):
    assert key(same, default_max_tokens=64) == key(BASE, default_max_tokens=64)


@pytest.mark.parametrize("other", [
    variant(temperature=0.5),
    variant(max_tokens=10),
    variant(top_p=0.9),
    variant(seed=1),
    variant(stop=["\n"]),
    variant(response_format={"type": "json_object"}),
    variant(frequency_penalty=0.5),
    variant(logit_bias={"50256": -100}),
    variant(tools=[{"type": "function", "function": {"name": "f"}}]),
    variant(some_future_field=True),  # unknown fields may matter to an OpenAI-compatible upstream
    variant(messages=[{"role": "system", "content": "Be detailed."}, {"role": "user", "content": "Capital of France?"}]),
    variant(messages=[{"role": "user", "content": "Capital of France?"}]),
    variant(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "capital of france?"}]),
    variant(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?",
                                                                    "name": "bob"}]),
])
def test_key_changes_with_everything_that_changes_the_answer(other):
    assert key(other) != key(BASE)


def test_key_scoped_by_tenant_tier_and_model():
    k = key(BASE)
    assert key(BASE, tenant="other") != k
    assert key(BASE, tier="large", model="llm-large") != k
    assert key(BASE, model="llm-small-v2") != k


def test_stop_order_does_not_matter_and_lowercase_is_opt_in():
    assert key(variant(stop=["a", "b"])) == key(variant(stop=["b", "a"]))
    lower = Normalization(lowercase=True)
    upper = variant(messages=[{"role": "system", "content": "BE BRIEF."}, {"role": "user", "content": "CAPITAL of France?"}])
    assert key(upper, norm=lower) == key(BASE, norm=lower)


def test_completions_prompt_is_normalised():
    a = canonical_request(req({"model": "m", "prompt": "Once  upon"}, "completions"))
    b = canonical_request(req({"model": "m", "prompt": "Once upon "}, "completions"))
    assert a == b and a["prompt"] == "Once upon"


def test_semantic_parts_last_user_turn_scope_holds_everything_else():
    scope, text = semantic_parts(req(BASE), tenant="t", tier="small", model="llm-small")
    assert text == "Capital of France?"
    para = variant(messages=[{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Which city is the capital of France?"}])
    assert semantic_parts(req(para), tenant="t", tier="small", model="llm-small")[0] == scope
    for other in (variant(messages=[{"role": "system", "content": "Be silly."}, {"role": "user", "content": "x"}]),
                  variant(temperature=0.1), variant(max_tokens=5)):
        assert semantic_parts(req(other), tenant="t", tier="small", model="llm-small")[0] != scope
    assert semantic_parts(req(BASE), tenant="u", tier="small", model="llm-small")[0] != scope
    assert semantic_parts(req(BASE), tenant="t", tier="large", model="llm-large")[0] != scope


def test_semantic_parts_earlier_turns_are_in_the_scope_and_non_user_last_turn_is_not_matched():
    two = {"model": "auto", "messages": [{"role": "user", "content": "Tell me about Paris"},
                                         {"role": "assistant", "content": "Paris is..."},
                                         {"role": "user", "content": "And its population?"}]}
    other = json.loads(json.dumps(two))
    other["messages"][0]["content"] = "Tell me about Rome"
    s1, t1 = semantic_parts(req(two), tenant="t", tier="s", model="m")
    s2, t2 = semantic_parts(req(other), tenant="t", tier="s", model="m")
    assert t1 == t2 and s1 != s2
    ends_with_assistant = {"model": "auto", "messages": two["messages"][:2]}
    assert semantic_parts(req(ends_with_assistant), tenant="t", tier="s", model="m") is None


def test_semantic_parts_conversation_mode():
    two = {"model": "auto", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                                         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}
    scope, text = semantic_parts(req(two), tenant="t", tier="s", model="m", mode="conversation")
    assert text == "user: a\nassistant: b\nuser: c"
    assert scope["params"]["context"] == [{"role": "system", "content": "S"}]


def test_deterministic():
    assert deterministic(req(variant(temperature=0)))
    assert not deterministic(req(variant(temperature=0.7)))
    assert deterministic(req(variant(temperature=0.7)), max_temperature=1.0)
    no_temp = dict(BASE)
    no_temp.pop("temperature")
    assert not deterministic(req(no_temp))  # OpenAI's default temperature is 1
    assert deterministic(req(no_temp), default_temperature=0)
    assert not deterministic(req(variant(n=2)))


def test_body_hash_ignores_key_order_only():
    assert body_hash({"a": 1, "b": [1, 2]}) == body_hash({"b": [1, 2], "a": 1})
    assert body_hash({"a": 1}) != body_hash({"a": 2})


def test_exact_fingerprint_is_the_exact_key_computed_once_per_request_and_scope():
    from types import SimpleNamespace

    from extproc_plugins.caching.cache_keys import exact_fingerprint

    def fresh(**kw):
        return fingerprint(exact_key_parts(ctx.request, tenant=ctx.tenant, tier="small", model="llm-small", **kw))

    ctx = SimpleNamespace(request=req(BASE), tenant="t", tier="small", tier_config=SimpleNamespace(model="llm-small"),
                          plugin_state={})
    first = exact_fingerprint(ctx)
    assert first == key(BASE)
    ctx.request.messages[-1].content = "changed in place after the key was taken: the memo holds"
    assert exact_fingerprint(ctx) == first
    # Another scope or setting computes afresh (from the request as it is now).
    assert exact_fingerprint(ctx, norm=Normalization(lowercase=True)) == fresh(norm=Normalization(lowercase=True))
    assert exact_fingerprint(ctx, default_max_tokens=64) == fresh(default_max_tokens=64)
    ctx.tenant = "other"
    assert exact_fingerprint(ctx) == fresh() != first
    ctx.request = req(variant(temperature=0.1))
    assert exact_fingerprint(ctx) == key(variant(temperature=0.1), tenant="other")
