"""Hostile input, fuzzed in process: every body ``parse_request`` is given is either accepted or
refused with an :class:`OpenAIError` of a 4xx status, never another exception.

Bounded and reproducible: a fixed number of examples per property, no deadline flakiness on a
loaded 2-core machine (an explicit, generous deadline), derandomized (the same examples every run,
in CI and locally; set ``EXTPROC_FUZZ_RANDOM=1`` to explore new ones).
"""

from __future__ import annotations

import json
import os

import pytest

from ..conftest import IN_CI

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the `test` extra installs it
    if IN_CI:
        raise  # fail loudly under CI
    pytest.skip("hypothesis is not installed (pip install -e '.[test]')", allow_module_level=True)

from extproc.formats.openai import OpenAIError, OpenAIRequest, parse_request, request_to_body

FUZZ = settings(
    max_examples=300,
    deadline=2000,  # ms per example: a loaded CI box must not turn slowness into failures
    derandomize=os.environ.get("EXTPROC_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def check(endpoint: str, body: bytes) -> None:
    """The property: accepted (and then serialisable back to valid UTF-8 JSON), or a 4xx OpenAIError."""
    try:
        req = parse_request(endpoint, body)
    except OpenAIError as err:
        assert 400 <= err.status < 500, err
        assert err.to_dict()["error"]["message"]
        json.loads(err.to_json())
        return
    assert isinstance(req, OpenAIRequest)
    out = request_to_body(req)  # what a passthrough upstream gets: must be strict JSON, valid UTF-8
    json.loads(out.decode("utf-8"), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


# -- strategies -------------------------------------------------------------------------------

# Any JSON value, with hostile leaves: huge ints and floats, every code point (surrogates
# included, which json.dumps escapes as \udXXX), empty and long strings.
leaves = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40),
)
json_values = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=12)

ROLES = ["system", "developer", "user", "assistant", "tool", "function", "robot", ""]
FIELDS = ["model", "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens",
          "temperature", "top_p", "stop", "seed", "n", "user", "presence_penalty", "frequency_penalty",
          "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "logit_bias", "best_of",
          "echo", "suffix"]

message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(ROLES), json_values)},
    optional={"content": json_values, "name": json_values, "tool_calls": json_values,
              "tool_call_id": json_values, "extra": json_values},
)
# Bodies shaped like OpenAI requests, each field of any type: the validators' every branch.
request_like = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["auto", "small", ""]), json_values),
     "messages": st.one_of(st.lists(message, max_size=4), json_values)},
    optional={name: json_values for name in FIELDS if name not in ("model", "messages")},
)


@FUZZ
@given(endpoint=st.sampled_from(["chat", "completions"]), body=st.binary(max_size=300))
def test_arbitrary_bytes(endpoint, body):
    check(endpoint, body)


@FUZZ
@given(endpoint=st.sampled_from(["chat", "completions"]), value=json_values)
def test_any_json_value(endpoint, value):
    check(endpoint, json.dumps(value).encode())


@settings(FUZZ, max_examples=150)
@given(endpoint=st.sampled_from(["chat", "completions"]), body=request_like)
def test_request_shaped_bodies_with_wrong_types(endpoint, body):
    if endpoint == "completions":
        body["prompt"] = body.pop("messages")
    check(endpoint, json.dumps(body).encode())


@settings(FUZZ, max_examples=150)
@given(body=request_like, cut=st.integers(min_value=0, max_value=400), junk=st.binary(max_size=8))
def test_truncated_and_corrupted_json(body, cut, junk):
    raw = json.dumps(body).encode()
    check("chat", raw[:cut] + junk)


@FUZZ
@given(lone=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
       prefix=st.text(max_size=5), suffix=st.text(max_size=5))  # st.text never draws a surrogate itself
def test_lone_surrogates_are_refused(lone, prefix, suffix):
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": prefix + lone + suffix}]}).encode()
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", body)
    assert err.value.status == 400


@FUZZ
@given(bad=st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
def test_invalid_utf8_is_400(bad):
    body = b'{"model":"auto","messages":[{"role":"user","content":"' + bad + b'"}]}'
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", body)
    assert err.value.status == 400


@pytest.mark.parametrize("depth", [10, 1_000, 100_000])
def test_deep_nesting_is_accepted_or_400(depth):
    check("chat", b'{"model":"auto","messages":[{"role":"user","content":"hi"}],"x":' + b"[" * depth
          + b"]" * depth + b"}")
    check("chat", b"[" * depth + b"]" * depth)
    check("chat", b'{"a":' * depth + b"1" + b"}" * depth)


@pytest.mark.parametrize("number", [b"1" * 5000, b"-" + b"9" * 5000, b"1e999", b"1e-999", b"0." + b"0" * 5000 + b"1",
                                    b"123456789012345678901234567890"])
def test_huge_numbers_are_accepted_or_400(number):
    for field in (b"temperature", b"max_tokens", b"seed", b"x"):
        check("chat", b'{"model":"auto","messages":[{"role":"user","content":"hi"}],"' + field + b'":'
              + number + b"}")
