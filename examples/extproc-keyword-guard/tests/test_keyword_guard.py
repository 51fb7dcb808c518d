"""How a plugin author tests a policy: extproc.framework.testing drives the real lifecycle in-process."""

from extproc.framework.testing import GatewayHarness
from extproc_keyword_guard import KeywordGuard


async def test_blocked_word_is_refused_before_the_upstream():
    async with GatewayHarness(KeywordGuard, settings={"blocked": ["password"]}) as gw:
        result = await gw.chat("what is the admin PASSWORD?")
    assert result.status == 400
    assert result.json()["error"]["code"] == "content_policy"
    assert result.upstream_body is None


async def test_other_prompts_pass_and_are_tagged():
    async with GatewayHarness(KeywordGuard, settings={"blocked": ["password"]}) as gw:
        result = await gw.chat("hello")
    assert result.status == 200
    assert result.headers["x-keyword-guard"] == "checked"
    assert result.headers["x-keyword-guard-chars"] == "5"


def test_bad_settings_name_the_key():
    import pytest

    from extproc.framework.config import ConfigError

    with pytest.raises(ConfigError, match=r"settings\.blockd: unknown key"):
        GatewayHarness(KeywordGuard, settings={"blockd": ["x"]})
