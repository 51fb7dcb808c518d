"""Golden wire tests: every ext_proc message the service sends, for representative requests.

Each case plays Envoy against the real servicer and gateway (the embedded default configuration
and its plugin chain) and compares the answers, as text protobuf, with ``tests/golden/data/<case>.txtpb``.
They guard refactors that must not change behaviour: a move of modules, a new translator layer.
Only what is random by nature is normalised (completion ids, ``created``; see ``wire_driver``).

A deliberate change of what goes on the wire updates them: ``EXTPROC_GOLDEN_UPDATE=1 pytest
tests/golden``, then read the diff of ``tests/golden/data`` before committing it. A missing file fails.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from extproc.framework.config import PluginEntry, load_config
from extproc.framework.gateway import Gateway
from extproc.framework.hookspecs import hookimpl

from .wire_driver import Exchange, play

DATA = Path(__file__).with_name("data")
UPDATE = os.environ.get("EXTPROC_GOLDEN_UPDATE") == "1"
CLOSED_PORT_METRICS = "http://127.0.0.1:1/metrics"  # load_spill: no queue data, never a spill


def check(case: str, exchanges: list[Exchange]) -> None:
    text = "".join(f"## request {i + 1}\n{e.text()}" for i, e in enumerate(exchanges))
    path = DATA / f"{case}.txtpb"
    if UPDATE:
        DATA.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing: record it with EXTPROC_GOLDEN_UPDATE=1"
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            str(path), "now"))
        pytest.fail(f"the service's ext_proc messages changed for {case}:\n{diff}")


def default_config(tmp_path, *, extra_plugins: list[dict] = (), tiers: dict | None = None):
    """The embedded default config: its plugin chain, one worker, no metrics endpoint reached."""
    cfg = load_config(None)
    plugins = []
    for entry in cfg.plugins:
        settings = dict(entry.settings)
        if entry.name == "usage_records":
            settings["path"] = str(tmp_path / "usage.jsonl")
        if entry.name == "load_spill":
            settings["metrics_url"] = CLOSED_PORT_METRICS
        plugins.append(entry.model_copy(update={"settings": settings}))
    position = next(i for i, p in enumerate(plugins) if p.name == "model_tiers")
    for extra in extra_plugins:
        plugins.insert(position, PluginEntry(**extra))
    update = {"plugins": plugins, "server": cfg.server.model_copy(update={"workers": 1, "triton_metrics_url": None})}
    if tiers:
        update["tiers"] = {**cfg.tiers, **{name: cfg.tiers["small"].model_copy(update=t) for name, t in tiers.items()}}
    return cfg.model_copy(update=update)


class gateway_for:
    """``async with gateway_for(config) as gw``: a started gateway, stopped after."""

    def __init__(self, config, extra_plugins=()):
        self.gateway = Gateway(config, extra_plugins=tuple(extra_plugins))

    async def __aenter__(self) -> Gateway:
        await self.gateway.start()
        return self.gateway

    async def __aexit__(self, *exc) -> None:
        await self.gateway.stop()


def chat(content: str, *, model: str = "small", stream: bool = False, **fields) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **fields}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def test_pinned_tier_not_streamed(tmp_path):
    async with gateway_for(default_config(tmp_path)) as gw:
        check("pinned_json", [await play(gw, chat("Say hello.", temperature=0.7), answer="Hello there")])


async def test_pinned_tier_streamed(tmp_path):
    async with gateway_for(default_config(tmp_path)) as gw:
        check("pinned_stream", [await play(gw, chat("Count to three.", stream=True, temperature=0.7),
                                           answer="one two three")])


async def test_auto_not_streamed(tmp_path):
    async with gateway_for(default_config(tmp_path)) as gw:
        check("auto_json", [await play(gw, chat("Prove that there are infinitely many primes.", model="auto",
                                                temperature=0.7), answer="Suppose not")])


async def test_auto_streamed(tmp_path):
    async with gateway_for(default_config(tmp_path)) as gw:
        check("auto_stream", [await play(gw, chat("hi", model="auto", stream=True, temperature=0.7),
                                         answer="Hi, how can I help")])


async def test_exact_cache_hit(tmp_path):
    async with gateway_for(default_config(tmp_path)) as gw:
        first = await play(gw, chat("What is the capital of France?", temperature=0), answer="Paris")
        second = await play(gw, chat("What is the capital of France?", temperature=0), answer="never sent")
        streamed = await play(gw, chat("What is the capital of France?", temperature=0, stream=True),
                              answer="never sent")
    check("exact_cache_hit", [first, second, streamed])


async def test_bad_requests_get_400(tmp_path):
    async with gateway_for(default_config(tmp_path)) as gw:
        check("bad_request_400", [
            await play(gw, b"{not json"),
            await play(gw, {"model": "small"}),
            await play(gw, chat("hi", temperature=5)),
        ])


async def test_budget_exceeded_gets_429(tmp_path):
    budgets = {"name": "budgets", "settings": {"defaults": {"tenant": {"requests_per_day": 1}}}}
    async with gateway_for(default_config(tmp_path, extra_plugins=[budgets])) as gw:
        check("budget_429", [
            await play(gw, chat("first", temperature=0.7), answer="ok"),
            await play(gw, chat("second", temperature=0.7), answer="never sent"),
        ])


async def test_openai_kind_tier(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLDEN_UPSTREAM_KEY", "sk-upstream-golden")
    tiers = {"hosted": {"model": "gpt-4o-mini", "kind": "openai", "aliases": [], "cluster": "tier_passthrough",
                        "api_key_env": "GOLDEN_UPSTREAM_KEY"}}
    async with gateway_for(default_config(tmp_path, tiers=tiers)) as gw:
        check("openai_tier", [
            await play(gw, chat("hello", model="hosted", temperature=0.7), upstream="openai", answer="Hi there friend",
                       headers={"authorization": "Bearer sk-client"}),
            await play(gw, chat("hello", model="hosted", stream=True, temperature=0.7), upstream="openai",
                       answer="Hi there friend"),
            await play(gw, chat("hello", model="hosted", temperature=0.7), upstream_status=429,
                       upstream_body=b'{"error": {"message": "slow down", "type": "rate_limit"}}'),
        ])


class Broken:
    """A plugin that always raises once the request is parsed."""

    @hookimpl
    def extproc_request_parsed(self, ctx):
        raise RuntimeError("broken on purpose")


async def test_plugin_failing_open_and_closed(tmp_path):
    cfg = default_config(tmp_path)
    async with gateway_for(cfg, extra_plugins=[("broken", Broken, {}, True)]) as gw:
        failing_open = await play(gw, chat("hello", temperature=0.7), answer="still answered")
    async with gateway_for(cfg, extra_plugins=[("broken", Broken, {}, False)]) as gw:
        failing_closed = await play(gw, chat("hello", temperature=0.7))
    check("plugin_failure", [failing_open, failing_closed])


async def test_models_list_and_unknown_model(tmp_path):
    async with gateway_for(default_config(tmp_path)) as gw:
        check("models_and_404", [
            await play(gw, None, path="/v1/models", method="GET"),
            await play(gw, chat("hi", model="no-such-model")),
            await play(gw, None, path="/v1/nothing-here", method="GET"),
            await play(gw, chat("hi"), path="/v1/completions"),
        ])


async def test_upstream_error_status(tmp_path):
    async with gateway_for(default_config(tmp_path)) as gw:
        check("upstream_error", [
            await play(gw, chat("hi", temperature=0.7), upstream_status=400,
                       upstream_body=b'{"error": "Stub process not healthy"}'),
            await play(gw, chat("hi", stream=True, temperature=0.7), upstream_status=503,
                       upstream_body=b"upstream connect error or disconnect/reset before headers"),
        ])
