"""What happens when a plugin raises: fail_closed refuses, fail_open degrades loudly."""

from __future__ import annotations

import logging

import pytest

from extproc import hookimpl
from extproc.framework.testing import GatewayHarness


class Broken:
    """Raises in a request-phase hook."""

    @hookimpl
    def extproc_request_parsed(self, ctx):
        raise RuntimeError("policy store unreachable")


class BrokenAfterUpstream:
    @hookimpl
    def extproc_response_complete(self, ctx):
        raise RuntimeError("metrics sink down")


async def test_fail_closed_refuses_with_openai_500_naming_the_plugin(caplog):
    async with GatewayHarness(Broken) as gw:
        result = await gw.chat("hi")
    assert result.replied and result.status == 500
    error = result.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "plugin_error"
    assert "Broken" in error["message"]
    assert result.upstream_body is None  # nothing went upstream
    assert gw.gateway.hooks.failures[("Broken", "extproc_request_parsed")] == 1
    assert "policy store unreachable" in caplog.text


async def test_fail_open_goes_on_but_flags_counts_and_logs(caplog):
    caplog.set_level(logging.ERROR)
    async with GatewayHarness(Broken, on_error="fail_open") as gw:
        first = await gw.chat("hi")
        second = await gw.chat("again")
    for result in (first, second):
        assert result.status == 200
        assert result.headers["x-extproc-degraded"] == "Broken"
        assert result.json()["choices"][0]["message"]["content"]
    assert gw.gateway.hooks.failures[("Broken", "extproc_request_parsed")] == 2
    # logged with its traceback once, then rate-limited
    records = [r for r in caplog.records if "policy store unreachable" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info


async def test_failure_after_the_upstream_answered_never_loses_the_answer():
    async with GatewayHarness(BrokenAfterUpstream) as gw:  # fail_closed, yet...
        result = await gw.chat("hi")
    assert result.status == 200 and result.json()["choices"]
    assert result.ctx.degraded == ["BrokenAfterUpstream"]
    assert gw.gateway.hooks.failures[("BrokenAfterUpstream", "extproc_response_complete")] == 1


async def test_failure_in_startup_of_a_fail_closed_plugin_stops_the_worker():
    import pytest

    from extproc.framework.hookspecs import PluginFailure

    class BadStart:
        @hookimpl
        def extproc_startup(self, gateway):
            raise RuntimeError("cannot connect")

    harness = GatewayHarness(BadStart)
    with pytest.raises(PluginFailure):
        await harness.gateway.start()


@pytest.mark.parametrize("marker", [{"wrapper": True}, {"hookwrapper": True}])
def test_a_hook_wrapper_is_refused_at_start_up_naming_the_plugin(marker):
    from extproc.framework.config import ConfigError

    class Wrapping:
        @hookimpl(**marker)
        def extproc_request_parsed(self, ctx):
            yield

    with pytest.raises(ConfigError, match=r"plugin 'Wrapping': extproc_request_parsed is marked "
                                          + list(marker)[0] + "=True"):
        GatewayHarness(Wrapping)
