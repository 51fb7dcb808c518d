"""Testing plugins without Envoy or Triton: drive the real request lifecycle in-process.

:class:`GatewayHarness` builds a real :class:`~extproc.framework.gateway.Gateway` with your plugin registered
(after the configured ones) and plays the part of Envoy: it hands the lifecycle the same phases
Envoy would, and plays the upstream with a canned Triton answer. Example::

    from extproc.framework.testing import GatewayHarness

    async def test_my_policy_refuses_secrets():
        async with GatewayHarness(MyPolicy, settings={"words": ["secret"]}) as gw:
            result = await gw.chat("tell me the secret")
        assert result.status == 400
        assert result.json()["error"]["code"] == "content_policy"

Everything here is the production code path except the network: plugins see the same context,
hooks run in the same order with the same failure policies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from extproc.framework.config import GatewayConfig, PluginEntry, load_config
from extproc.framework.context import RequestContext
from extproc.wire.decisions import Continue, Reply
from extproc.framework.gateway import Gateway
from extproc.formats.sse import SSEParser


@dataclass
class HarnessResult:
    """What the client would have received, and what went upstream."""

    status: int
    headers: dict[str, str]
    body: bytes
    ctx: RequestContext
    replied: bool = False
    upstream_path: str | None = None
    upstream_headers: dict[str, str] = field(default_factory=dict)
    upstream_body: bytes | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The SSE ``data`` payloads of a streamed answer."""
        parser = SSEParser()
        return [e.data for e in parser.feed(self.body) + parser.flush()]

    @property
    def upstream_json(self) -> Any:
        return json.loads(self.upstream_body) if self.upstream_body else None


def triton_answer(text: str, *, prompt_tokens: int = 5) -> list[bytes]:
    """A Triton generate_stream answer (SSE, one event per word) as body chunks: what Triton
    sends the gateway, which always asks it to stream (extproc/upstreams/triton.py)."""
    words = text.split(" ")
    chunks = []
    for i, word in enumerate(words):
        delta = word if i == 0 else " " + word
        event = {"model_name": "m", "model_version": "1", "text_output": delta,
                 "prompt_tokens": prompt_tokens, "completion_tokens": i + 1,
                 "finish_reason": "stop" if i == len(words) - 1 else ""}
        chunks.append(b"data: " + json.dumps(event).encode() + b"\n\n")
    return chunks


_SEND_OPTIONS = frozenset({"path", "method", "headers", "answer", "upstream_status", "upstream_chunks",
                           "abort_after_chunks"})


class GatewayHarness:
    """Run requests through a real Gateway in-process; see the module docstring.

    :param plugins: plugin classes or modules to register for this harness only.
    :param settings: the plugin's settings, validated by its ``Settings`` model; with several
        plugins, a mapping from each plugin's name (its class or module name) to its settings.
    :param config: a config dict or :class:`GatewayConfig`; default: the embedded default with only
        the ``model_tiers`` plugin from the configuration.
    :param on_error: ``"fail_closed"`` or ``"fail_open"`` for the plugins given.
    """

    def __init__(self, *plugins: Any, settings: dict | None = None, config: dict | GatewayConfig | None = None,
                 on_error: str = "fail_closed"):
        if isinstance(config, dict):
            from extproc.framework.config import parse_config

            config = parse_config(config)
        if config is None:
            config = load_config(None)
            config = config.model_copy(update={"plugins": [PluginEntry(name="model_tiers")]})
        self.config = config
        names = [getattr(plugin, "__name__", type(plugin).__name__).rsplit(".", 1)[-1] for plugin in plugins]
        per_plugin = _settings_by_plugin(names, settings)
        extra = [(name, plugin, per_plugin.get(name, {}), on_error == "fail_open") for name, plugin in zip(names, plugins)]
        self.gateway = Gateway(config, extra_plugins=tuple(extra))

    async def __aenter__(self) -> "GatewayHarness":
        await self.gateway.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.gateway.stop()

    async def chat(self, content: str, *, model: str = "auto", stream: bool = False, **options) -> HarnessResult:
        """Send a one-message chat completion.

        Keyword options that :meth:`send` takes (``answer``, ``headers``, ``upstream_status``...) go
        to it; any other keyword becomes a field of the request body.
        """
        send_options = {k: options.pop(k) for k in list(options) if k in _SEND_OPTIONS}
        body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream, **options}
        return await self.send(body, **send_options)

    async def send(self, body: dict | bytes, *, path: str = "/v1/chat/completions", method: str = "POST",
                   headers: dict[str, str] | None = None, answer: str = "Hello from the upstream",
                   upstream_status: int = 200, upstream_chunks: list[bytes] | None = None,
                   abort_after_chunks: int | None = None) -> HarnessResult:
        """Play one request through every phase, as Envoy would.

        :param answer: the text the fake Triton upstream answers with.
        :param upstream_chunks: the upstream's raw body chunks instead (overrides ``answer``).
        :param abort_after_chunks: stop after this many response chunks, as if the client left.
        """
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        stream = isinstance(body, dict) and bool(body.get("stream"))
        req_headers = {":method": method, ":path": path, "content-type": "application/json",
                       "content-length": str(len(raw)), "x-request-id": "test-request", **(headers or {})}
        life = self.gateway.new_stream()
        try:
            decision = await life.request_headers(req_headers, False)
            if isinstance(decision, Reply):
                return await self._replied(decision, life)
            decision = await life.request_body(raw, True)
            if isinstance(decision, Reply):
                return await self._replied(decision, life)
            up_headers = {k: v for k, v in req_headers.items()}
            for name in getattr(decision, "remove_headers", []):
                up_headers.pop(name, None)
            up_headers.update(dict(decision.set_headers))
            result = HarnessResult(0, {}, b"", life.ctx, upstream_path=up_headers.get(":path"),
                                   upstream_headers=up_headers, upstream_body=decision.body or raw)
            chunks = upstream_chunks if upstream_chunks is not None else triton_answer(answer)
            resp_headers = {":status": str(upstream_status), "content-type": "application/json"}
            decision = await life.response_headers(resp_headers, False)
            if isinstance(decision, Reply):
                return await self._replied(decision, life)
            resp_headers.update(dict(decision.set_headers))
            for name in decision.remove_headers:
                resp_headers.pop(name, None)
            result.status, result.headers = int(resp_headers[":status"]), resp_headers
            out = bytearray()
            for i, chunk in enumerate(chunks):
                if abort_after_chunks is not None and i >= abort_after_chunks:
                    await life.stream_closed(True)
                    result.body = bytes(out)
                    return result
                last = i == len(chunks) - 1
                decision = await life.response_body(chunk, last)
                out += _body_after(decision, chunk)
            if not chunks:
                decision = await life.response_body(b"", True)
                out += _body_after(decision, b"")
            result.body = bytes(out)
            await life.stream_closed(False)
            return result
        except BaseException:
            if life.ctx is not None and life.ctx.finished_at is None:
                await life.stream_closed(True)
            raise

    @staticmethod
    async def _replied(reply: Reply, life) -> HarnessResult:
        await life.stream_closed(False)
        return HarnessResult(reply.status, dict(reply.headers), reply.body, life.ctx, replied=True)


def _settings_by_plugin(names: list[str], settings: dict | None) -> dict[str, dict]:
    """Each given plugin's settings: ``settings`` itself for one plugin, else looked up by name."""
    if not settings:
        return {}
    if len(names) == 1:
        return {names[0]: settings}
    unknown = [key for key in settings if key not in names or not isinstance(settings[key], dict)]
    if unknown:
        raise ValueError(f"with several plugins ({', '.join(names)}), settings maps each plugin's name to its "
                         f"settings; not a plugin given with a dict of settings: {', '.join(map(str, unknown))}")
    return dict(settings)


def _body_after(decision, original: bytes) -> bytes:
    if isinstance(decision, Continue) and decision.body is not None:
        return decision.body
    return original
