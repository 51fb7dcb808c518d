"""Per-model load from Triton's Prometheus endpoint (``http://host:8002/metrics``).

    client = TritonMetricsClient("http://127.0.0.1:8002/metrics", timeout=1.0, max_age=1.0)
    loads = await client.snapshot()          # {"llm-small": ModelLoad(...), ...}
    loads["llm-small"].pending, loads["llm-small"].avg_batch

``snapshot()`` is cached for ``max_age`` seconds and concurrent callers share one scrape, so a
plugin can call it on every request.  A failed scrape raises :class:`TritonMetricsError`; the
failure is cached for ``max_age`` too, so a Triton that is down is not hammered per request.

Metrics read (Triton's names; summed over model versions):

* ``nv_inference_pending_request_count`` (gauge) -> ``pending``: requests queued or executing;
* ``nv_inference_queue_duration_us`` (counter)   -> ``queue_us_total``;
* ``nv_inference_request_success`` / ``_failure`` -> ``success`` / ``failure`` (requests);
* ``nv_inference_count`` (counter)               -> ``inference_count`` (batch items inferred);
* ``nv_inference_exec_count`` (counter)          -> ``exec_count`` (model executions): average
  batch = inference_count / exec_count;
* ``nv_inference_request_duration_us``, ``nv_inference_compute_infer_duration_us``;
* ``nv_gpu_memory_used_bytes`` / ``nv_gpu_memory_total_bytes`` (per ``gpu_uuid``) when Triton runs
  with GPUs: :attr:`TritonMetricsClient.gpu_memory_used` / ``gpu_memory_total``.

Other per-model gauges can be read too, by *selector* (``name`` or ``name{label="value",...}``,
summed over the samples whose labels match): ``TritonMetricsClient(url, extra=(selector, ...))``
fills :attr:`ModelLoad.extra` ``{selector: value}``. Queue depth of decoupled LLM backends lives
there, not in ``pending`` (which counts only requests not yet handed to the backend): TensorRT-LLM's
in-flight batcher reports ``nv_trt_llm_request_metrics{request_type="waiting"}``.

Counters are cumulative since Triton started; :meth:`ModelLoad.since` turns two snapshots into
the activity between them.  Transport: one HTTP/1.1 GET over ``asyncio.open_connection`` (no
dependency beyond ``prometheus_client``'s parser).
"""

from __future__ import annotations

import asyncio
import time
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from extproc.wire.http1 import read_response

__all__ = ["ModelLoad", "TritonMetricsClient", "TritonMetricsError", "parse_metrics", "parse_selector", "fetch_text"]


class TritonMetricsError(RuntimeError):
    """The metrics endpoint could not be read or parsed."""


@dataclass(frozen=True)
class ModelLoad:
    pending: int
    queue_us_total: float
    inference_count: int
    exec_count: int
    success: int
    failure: int = 0
    request_us_total: float = 0.0
    compute_infer_us_total: float = 0.0
    extra: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)
    """Values of the extra selectors asked for (``{selector: summed value}``); see the module doc."""

    @property
    def avg_batch(self) -> float:
        """Average items per model execution (0.0 before the first execution)."""
        return self.inference_count / self.exec_count if self.exec_count else 0.0

    @property
    def avg_queue_us(self) -> float:
        """Average queue time per successful request, in microseconds."""
        return self.queue_us_total / self.success if self.success else 0.0

    def since(self, older: "ModelLoad") -> "ModelLoad":
        """Counters as differences from ``older`` (``pending`` stays the current value).

        A counter that went backwards (Triton restarted) is taken as counting from zero.
        """

        def d(new, old):
            return new - old if new >= old else new

        return replace(
            self,
            queue_us_total=d(self.queue_us_total, older.queue_us_total),
            inference_count=d(self.inference_count, older.inference_count),
            exec_count=d(self.exec_count, older.exec_count),
            success=d(self.success, older.success),
            failure=d(self.failure, older.failure),
            request_us_total=d(self.request_us_total, older.request_us_total),
            compute_infer_us_total=d(self.compute_infer_us_total, older.compute_infer_us_total),
        )


_MODEL_FIELDS = {
    "nv_inference_pending_request_count": "pending",
    "nv_inference_queue_duration_us": "queue_us_total",
    "nv_inference_count": "inference_count",
    "nv_inference_exec_count": "exec_count",
    "nv_inference_request_success": "success",
    "nv_inference_request_failure": "failure",
    "nv_inference_request_duration_us": "request_us_total",
    "nv_inference_compute_infer_duration_us": "compute_infer_us_total",
}
_INT_FIELDS = {"pending", "inference_count", "exec_count", "success", "failure"}
_GPU_FIELDS = {"nv_gpu_memory_used_bytes": "used", "nv_gpu_memory_total_bytes": "total"}


_SELECTOR = re.compile(r'^\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{(.*)\})?\s*$')
_SELECTOR_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,"]*?))\s*(?:,|$)')


def parse_selector(selector: str) -> tuple[str, dict[str, str]]:
    """``'name{a="x",b=y}'`` -> ``("name", {"a": "x", "b": "y"})``; raises ValueError if malformed."""
    m = _SELECTOR.match(selector)
    if not m:
        raise ValueError(f"bad metric selector {selector!r} (expected name or name{{label=\"value\"}})")
    name, body = m.group(1), (m.group(2) or "").strip()
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        lm = _SELECTOR_LABEL.match(body, pos)
        if not lm or lm.end() == pos:
            raise ValueError(f"bad labels in metric selector {selector!r}")
        labels[lm.group(1)] = lm.group(2) if lm.group(2) is not None else lm.group(3).strip()
        pos = lm.end()
    return name, labels


def parse_metrics(text: str, extra: Sequence[str] = ()) -> tuple[dict[str, ModelLoad], dict[str, dict[str, float]]]:
    """Parse Prometheus text: ``({model: ModelLoad}, {"used"|"total": {gpu_uuid: bytes}})``.

    :param extra: selectors of other per-model gauges to sum into :attr:`ModelLoad.extra`.
    """
    wanted: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for selector in extra:
        name, labels = parse_selector(selector)
        wanted.setdefault(name, []).append((selector, labels))
    extra_acc: dict[str, dict[str, float]] = {}
    acc: dict[str, dict[str, float]] = {}
    gpu: dict[str, dict[str, float]] = {"used": {}, "total": {}}
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises ValueError & co. on malformed input
        raise TritonMetricsError(f"malformed metrics text: {exc}") from exc
    for family in families:
        for sample in family.samples:
            name = sample.name
            if name.endswith("_total") and name not in _MODEL_FIELDS and name[: -len("_total")] in _MODEL_FIELDS:
                name = name[: -len("_total")]  # a parser/exposition that adds the counter suffix
            for selector, labels in wanted.get(name, ()):
                model = sample.labels.get("model")
                if model is not None and all(sample.labels.get(k) == v for k, v in labels.items()):
                    row = extra_acc.setdefault(model, {})
                    row[selector] = row.get(selector, 0.0) + float(sample.value)
            field = _MODEL_FIELDS.get(name)
            if field is not None:
                model = sample.labels.get("model")
                if model is None:
                    continue
                row = acc.setdefault(model, {})
                row[field] = row.get(field, 0.0) + float(sample.value)
                continue
            gfield = _GPU_FIELDS.get(name)
            if gfield is not None:
                key = sample.labels.get("gpu_uuid") or sample.labels.get("gpu") or str(len(gpu[gfield]))
                gpu[gfield][key] = float(sample.value)
    loads = {}
    for model in {**acc, **extra_acc}:
        row = acc.get(model, {})
        kwargs: dict[str, Any] = {}
        for field in _MODEL_FIELDS.values():
            v = row.get(field, 0.0)
            kwargs[field] = int(round(v)) if field in _INT_FIELDS else float(v)
        values = extra_acc.get(model, {})
        loads[model] = ModelLoad(**kwargs, extra={s: values.get(s, 0.0) for s in extra})
    return loads, gpu


async def fetch_text(url: str, timeout: float = 1.0) -> str:
    """GET ``url`` (plain http) and return the body; raises :class:`TritonMetricsError`."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise TritonMetricsError(f"unsupported metrics URL {url!r} (expected http://host:port/metrics)")
    host = parts.hostname
    port = parts.port or 80
    path = parts.path or "/metrics"
    if parts.query:
        path += "?" + parts.query
    host_header = f"[{host}]" if ":" in host else host

    async def _get() -> str:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                (
                    f"GET {path} HTTP/1.1\r\nHost: {host_header}:{port}\r\n"
                    "Accept: text/plain\r\nConnection: close\r\nUser-Agent: extproc-triton-metrics\r\n\r\n"
                ).encode("ascii")
            )
            await writer.drain()
            status, _, body = await read_response(reader)
            if status != 200:
                raise TritonMetricsError(f"GET {url}: HTTP {status}: {body[:200]!r}")
            return body.decode("utf-8", errors="replace")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    try:
        return await asyncio.wait_for(_get(), timeout)
    except TritonMetricsError:
        raise
    except asyncio.TimeoutError:
        raise TritonMetricsError(f"GET {url}: no answer within {timeout:g}s") from None
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        raise TritonMetricsError(f"GET {url}: {exc!r}") from exc


class TritonMetricsClient:
    """Cached, shared scrapes of one Triton metrics endpoint."""

    def __init__(self, url: str, *, timeout: float = 1.0, max_age: float = 1.0, extra: Sequence[str] = ()) -> None:
        self.url = url
        self.extra = tuple(extra)
        for selector in self.extra:
            parse_selector(selector)  # fail at construction, not on every scrape
        self.timeout = float(timeout)
        self.max_age = float(max_age)
        self.gpu_memory_used: dict[str, float] = {}
        self.gpu_memory_total: dict[str, float] = {}
        self.scrapes = 0  #: scrapes attempted (for tests and stats)
        self._value: dict[str, ModelLoad] | None = None
        self._error: TritonMetricsError | None = None
        self._at = float("-inf")
        self._inflight: asyncio.Future | None = None

    @property
    def age(self) -> float:
        """Seconds since the last scrape finished (inf before the first)."""
        return time.monotonic() - self._at

    async def snapshot(self) -> dict[str, ModelLoad]:
        """Per-model load, at most ``max_age`` seconds old."""
        if time.monotonic() - self._at < self.max_age:
            if self._error is not None:
                raise self._error
            assert self._value is not None
            return self._value
        fut = self._inflight
        if fut is None or fut.done() or fut.get_loop() is not asyncio.get_running_loop():
            fut = self._inflight = asyncio.ensure_future(self._scrape())
            # retrieve the outcome even if every waiter was cancelled (no "never retrieved" noise)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(fut)

    async def _scrape(self) -> dict[str, ModelLoad]:
        self.scrapes += 1
        try:
            text = await fetch_text(self.url, self.timeout)
            loads, gpu = parse_metrics(text, self.extra)
        except TritonMetricsError as exc:
            self._value, self._error, self._at = None, exc, time.monotonic()
            raise
        self.gpu_memory_used = gpu["used"]
        self.gpu_memory_total = gpu["total"]
        self._value, self._error, self._at = loads, None, time.monotonic()
        return loads

    def invalidate(self) -> None:
        """Forget the cached snapshot (the next call scrapes)."""
        self._at = float("-inf")
