"""Plugins in a real gateway process: a third-party package, and each failure policy."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def chat(http, content):
    return http.post("/v1/chat/completions", json={"model": "small", "max_tokens": 3,
                                                   "messages": [{"role": "user", "content": content}]})


def test_third_party_plugin_package_is_loaded_through_its_entry_point(http):
    refused = chat(http, "tell me the forbidden-word")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "content_policy"
    ok = chat(http, "hello")
    assert ok.status_code == 200 and ok.headers["x-keyword-guard"] == "checked"


def test_fail_closed_plugin_raising_refuses_with_500(http):
    r = chat(http, "please raise-closed now")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "plugin_error" and "test_raiser_closed" in err["message"]


def test_fail_open_plugin_raising_lets_the_request_through_flagged(http):
    r = chat(http, "please raise-open now")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert r.headers["x-extproc-degraded"] == "test_raiser_open"
