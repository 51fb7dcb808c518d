"""A second gateway (service + Envoy) in front of the same Triton: the fixture other tests build on."""

from __future__ import annotations

import openai
import pytest

from .conftest import E2E_CONFIG

pytestmark = pytest.mark.e2e


def test_second_gateway_shares_triton(stack, make_stack):
    second = make_stack(E2E_CONFIG, workers=1, share_triton_with=stack)
    assert second.triton is None and second.ports.triton_http == stack.ports.triton_http
    for s in (stack, second):
        client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="small", max_tokens=3, temperature=0,
                                               messages=[{"role": "user", "content": "same"}])
        assert reply.usage.completion_tokens > 0
