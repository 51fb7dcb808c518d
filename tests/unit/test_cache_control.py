"""Client cache directives and the TTL policy."""

from __future__ import annotations

import pytest

from extproc_plugins.caching.cache_control import CacheDirectives, CacheTTL, parse_cache_headers
from extproc.formats.openai import OpenAIError


@pytest.mark.parametrize("headers,expected", [
    ({}, CacheDirectives()),
    ({"cache-control": "no-cache"}, CacheDirectives(no_cache=True)),
    ({"cache-control": "No-Store"}, CacheDirectives(no_store=True)),
    ({"cache-control": "no-cache, no-store"}, CacheDirectives(no_cache=True, no_store=True)),
    ({"cache-control": "max-age=60"}, CacheDirectives(max_age=60.0)),
    ({"cache-control": 'max-age="30", private'}, CacheDirectives(max_age=30.0)),
    ({"cache-control": "max-age=0"}, CacheDirectives(no_cache=True, max_age=0.0)),
    ({"cache-control": "some-extension, only-if-cached"}, CacheDirectives()),  # unknown: ignored
    ({"pragma": "no-cache"}, CacheDirectives(no_cache=True)),
    ({"x-cache-ttl": "120"}, CacheDirectives(ttl=120.0)),
    ({"x-cache-ttl": "0"}, CacheDirectives(ttl=0.0)),
])
def test_parse(headers, expected):
    assert parse_cache_headers(headers) == expected


@pytest.mark.parametrize("headers,code", [
    ({"x-cache-ttl": "soon"}, "invalid_cache_ttl"),
    ({"x-cache-ttl": "-5"}, "invalid_cache_ttl"),
    ({"x-cache-ttl": "nan"}, "invalid_cache_ttl"),
    ({"cache-control": "max-age=abc"}, "invalid_cache_control"),
])
def test_bad_values_are_a_400(headers, code):
    with pytest.raises(OpenAIError) as err:
        parse_cache_headers(headers)
    assert err.value.status == 400 and err.value.code == code


def test_ttl_most_specific_wins_and_client_header_is_clamped():
    ttl = CacheTTL(default_seconds=100, max_seconds=1000, by_route={"/v1/completions": 50},
                   by_workflow={"nightly": 500}, by_tenant={"acme": 10, "nocache": 0})
    none = CacheDirectives()
    assert ttl.resolve(path="/v1/chat/completions", workflow=None, tenant="x", directives=none) == 100
    assert ttl.resolve(path="/v1/completions", workflow=None, tenant="x", directives=none) == 50
    assert ttl.resolve(path="/v1/completions", workflow="nightly", tenant="x", directives=none) == 500
    assert ttl.resolve(path="/v1/completions", workflow="nightly", tenant="acme", directives=none) == 10
    assert ttl.resolve(path="/", workflow=None, tenant="x", directives=CacheDirectives(ttl=5000)) == 1000
    assert ttl.resolve(path="/", workflow=None, tenant="x", directives=CacheDirectives(ttl=7)) == 7
    # the client cannot switch storing on where the policy says 0, and no-store wins
    assert ttl.resolve(path="/", workflow=None, tenant="nocache", directives=CacheDirectives(ttl=60)) == 0
    assert ttl.resolve(path="/", workflow=None, tenant="x", directives=CacheDirectives(no_store=True, ttl=60)) == 0
