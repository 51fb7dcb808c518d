"""What each bad input gets, through Envoy: the right status and an OpenAI-style error body."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.e2e


def error_of(response):
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


def test_malformed_json_is_400(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "auto", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "could not parse the JSON body" in error_of(r)["message"]


def test_missing_messages_is_400_naming_the_param(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="auto", messages=None)  # type: ignore[arg-type]
    assert err.value.status_code == 400
    assert err.value.body["param"] == "messages"


def test_wrong_type_is_400_naming_the_param(http):
    r = http.post("/v1/chat/completions", json={"model": "auto", "temperature": "hot",
                                                "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"


def test_unsupported_parameter_for_triton_is_400(http):
    r = http.post("/v1/chat/completions", json={"model": "small", "n": 3,
                                                "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    err = error_of(r)
    assert err["param"] == "n" and err["code"] == "unsupported_parameter"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"


def test_body_over_the_configured_size_is_413(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "auto", "messages": []' + b" " * (3 * 1024 * 1024) + b"}",
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


def test_unknown_path_is_404_and_wrong_method_405(http):
    r = http.post("/v1/embeddingz", json={})
    assert r.status_code == 404 and error_of(r)["type"] == "invalid_request_error"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405

