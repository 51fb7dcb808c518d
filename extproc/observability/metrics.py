"""Prometheus metrics: what every worker records, and how the parent process serves them.

**Multi-process.** ``extproc serve`` runs several worker processes; each records into
``prometheus_client``'s multiprocess mode (one small mmap file per process in a directory). The
parent creates a fresh directory per run (:func:`prepare_multiprocess_dir`, before it spawns the
workers, which inherit ``PROMETHEUS_MULTIPROC_DIR``), serves ``/metrics`` on ``server.metrics_port``
by merging every worker's file on each scrape (:func:`start_metrics_server`), marks a worker's file
dead when it exits (its counters stay: a counter never goes backwards) and deletes the directory
when it stops. Without the variable (tests, a single process) the same metrics live in memory.

**Naming.** ``extproc_`` prefix, units in names (``_seconds``, ``_bytes``, ``_usd``), counters end in
``_total``. **Cardinality** is bounded: tenants and workflows are labelled only when configured
(``metrics`` plugin settings; the rest are ``other``), routing reasons and plugin/phase names come
from configuration or are capped per worker (:class:`BoundedLabel`).

Triton's own numbers (queue depth, GPU memory, compute time) are read by the parent at scrape time
(:class:`TritonCollector`), once for all workers.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.request
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from extproc import environment
log = logging.getLogger(__name__)

MULTIPROC_ENV = environment.PROMETHEUS_MULTIPROC_DIR

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Request, upstream and time-to-first-token latency buckets (seconds)."""
FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
"""Gateway phase and plugin latency buckets (seconds)."""


class BoundedLabel:
    """Maps a value to a label value from a bounded set.

    Values in ``allowed`` are kept; up to ``dynamic`` other distinct values are kept in the order
    first seen (per process); everything else is ``other``. ``None`` is ``none``.
    """

    def __init__(self, allowed: Iterable[str] = (), dynamic: int = 0):
        self.allowed = set(allowed)
        self.dynamic = dynamic
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if value is None:
            return "none"
        if value in self.allowed or value in self.seen:
            return value
        if len(self.seen) < self.dynamic:
            self.seen.add(value)
            return value
        return "other"


class GatewayMetrics:
    """Every metric a worker records; one per process (:func:`get_metrics`)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        who = ["tenant", "workflow", "tier"]
        self.requests = Counter("extproc_requests_total", "Requests finished, by outcome "
                                "(completed, replied, aborted, failed).", [*who, "outcome"], registry=r)
        self.responses = Counter("extproc_responses_total", "Responses by HTTP status code.",
                                 ["tier", "code"], registry=r)
        self.tokens = Counter("extproc_tokens_total", "Tokens by kind: prompt and completion (the usage "
                              "returned to clients), saved (not generated thanks to a cache), cut (prompt "
                              "tokens removed by context caps).", [*who, "kind"], registry=r)
        self.cost = Counter("extproc_cost_usd_total", "Cost in USD by kind: prompt, completion, retries, "
                            "embeddings, overhead (gateway time).", [*who, "kind"], registry=r)
        self.cost_saved = Counter("extproc_cost_saved_usd_total", "Upstream cost avoided (caches, coalescing).",
                                  who, registry=r)
        self.retries = Counter("extproc_retries_total", "Requests the client marked as retries.", who, registry=r)
        self.embedding_calls = Counter("extproc_embedding_calls_total", "Embedding calls made by policies.",
                                       ["tenant", "workflow"], registry=r)
        self.embeddings = Counter("extproc_embeddings_total", "Prompt embeddings computed for requests, by "
                                  "where: local (in the worker), triton (Triton's embedder), local_fallback "
                                  "(in the worker because Triton could not answer).", ["backend"], registry=r)
        self.cache_requests = Counter("extproc_cache_requests_total", "Requests by cache status (hit, "
                                      "semantic_hit, coalesced, idempotent, miss, bypass).", ["tier", "status"],
                                      registry=r)
        self.cache_lookups = Counter("extproc_cache_lookups_total", "Cache lookups by layer and result.",
                                     ["layer", "result"], registry=r)
        self.budget_decisions = Counter("extproc_budget_decisions_total", "Budget checks by status "
                                        "(ok, soft_limit, rejected).", ["tenant", "status"], registry=r)
        self.budget_rejections = Counter("extproc_budget_rejections_total", "Requests refused by a budget.",
                                         ["tenant", "budget"], registry=r)
        self.budget_admissions = Counter("extproc_budget_admissions_total", "Budget admissions by where "
                                         "they were reserved: block (this worker's leased block, no store "
                                         "call) or store (a store call of their own).", ["source"], registry=r)
        self.routing = Counter("extproc_routing_decisions_total", "Tier choices by tier and reason.",
                               ["tier", "reason"], registry=r)
        self.route_steps = Counter("extproc_route_steps_total", "Routing steps recorded by each plugin "
                                   "(ctx.route_trace).", ["plugin"], registry=r)
        self.degraded = Counter("extproc_degraded_requests_total", "Requests a fail-open plugin failure "
                                "degraded.", ["plugin"], registry=r)
        self.plugin_failures = Counter("extproc_plugin_failures_total", "Plugin failures by plugin and hook "
                                       "(HookRunner.failures).", ["plugin", "hook"], registry=r)
        self.usage_records = Counter("extproc_usage_records_total", "Usage records by sink and result "
                                     "(written, fallback, dropped).", ["sink", "result"], registry=r)
        self.request_duration = Histogram("extproc_request_duration_seconds", "Request time, headers in to "
                                          "stream closed.", ["tier", "outcome"], buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.ttft = Histogram("extproc_time_to_first_token_seconds", "Request start to the first answer chunk "
                              "sent to the client.", ["tier", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram("extproc_upstream_duration_seconds", "Request sent upstream to "
                                           "answer complete.", ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.phase_duration = Histogram("extproc_phase_duration_seconds", "Gateway time in each ext_proc phase "
                                        "(its plugins included), per request.", ["phase"], buckets=FAST_BUCKETS,
                                        registry=r)
        self.plugin_duration = Histogram("extproc_plugin_duration_seconds", "Time in each plugin's hooks, per "
                                         "request.", ["plugin"], buckets=FAST_BUCKETS, registry=r)
        self._children: dict[tuple, object] = {}

    def child(self, metric, labels: tuple):
        """``metric.labels(*labels)``, cached (labels() itself costs ~2 µs)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


_metrics: GatewayMetrics | None = None


def get_metrics() -> GatewayMetrics:
    """This process's metrics (created on first use)."""
    global _metrics
    if _metrics is None:
        _metrics = GatewayMetrics()
    return _metrics


def metric_names() -> set[str]:
    """Every sample name the gateway exports (``_bucket``/``_sum``/``_count`` included), for checks."""
    names: set[str] = set()
    m = GatewayMetrics()
    for metric in vars(m).values():
        if isinstance(metric, Counter):
            names.add(metric._name + "_total")
        elif isinstance(metric, Histogram):
            names.update(metric._name + s for s in ("_bucket", "_sum", "_count"))
    names.update(TritonCollector.NAMES)
    return names


# --- the parent process ---------------------------------------------------------------------

def prepare_multiprocess_dir() -> str:
    """A fresh per-run directory for the workers' metric files; sets ``PROMETHEUS_MULTIPROC_DIR``.

    Under an existing ``$PROMETHEUS_MULTIPROC_DIR`` a private sub-directory is made, so runs never
    mix files (a stale file from a previous run would resurrect its counters).
    """
    parent = environment.prometheus_multiproc_dir()
    if parent:
        os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix="extproc-metrics-", dir=parent)
    environment.set_prometheus_multiproc_dir(path)
    return path


def worker_exited(pid: int, path: str) -> None:
    """Drop an exited worker's live gauges (its counters and histograms stay)."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, path)
    except OSError:
        pass


def remove_multiprocess_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


#: Per-model gauges of backends that queue requests themselves (Triton's pending count stays 0 for them).
BACKEND_QUEUES = ('nv_trt_llm_request_metrics{request_type="waiting"}', "reference_llm_waiting_requests")


class TritonCollector:
    """Triton's per-tier queue depth, compute time and GPU memory, read at scrape time."""

    NAMES = ("extproc_triton_up", "extproc_triton_queue_depth", "extproc_triton_compute_seconds_total",
             "extproc_triton_queue_seconds_total", "extproc_triton_inferences_total",
             "extproc_triton_gpu_memory_used_bytes", "extproc_triton_gpu_memory_total_bytes")

    def __init__(self, url: str, model_tiers: dict[str, str], timeout: float = 1.0):
        self.url, self.model_tiers, self.timeout = url, model_tiers, timeout

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from extproc.observability.triton_metrics import TritonMetricsError, parse_metrics

        up = GaugeMetricFamily("extproc_triton_up", "Whether Triton's metrics endpoint answered the last scrape.")
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as reply:
                loads, gpu = parse_metrics(reply.read().decode("utf-8", "replace"), BACKEND_QUEUES)
        except (OSError, ValueError, TritonMetricsError) as exc:
            log.debug("Triton metrics %s: %s", self.url, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        queue = GaugeMetricFamily("extproc_triton_queue_depth", "Requests waiting in Triton: its scheduler "
                                  "queue (nv_inference_pending_request_count) plus a decoupled backend's own "
                                  "(TensorRT-LLM's waiting requests, the reference tiers' waiting requests).",
                                  labels=["tier", "model"])
        compute = CounterMetricFamily("extproc_triton_compute_seconds", "Triton compute time "
                                      "(nv_inference_compute_infer_duration_us).", labels=["tier", "model"])
        queued = CounterMetricFamily("extproc_triton_queue_seconds", "Triton queue time "
                                     "(nv_inference_queue_duration_us).", labels=["tier", "model"])
        inferences = CounterMetricFamily("extproc_triton_inferences", "Batch items Triton inferred "
                                         "(nv_inference_count).", labels=["tier", "model"])
        for model, tier in self.model_tiers.items():
            load = loads.get(model)
            if load is None:
                continue
            queue.add_metric([tier, model], load.pending + sum(load.extra.values()))
            compute.add_metric([tier, model], load.compute_infer_us_total / 1e6)
            queued.add_metric([tier, model], load.queue_us_total / 1e6)
            inferences.add_metric([tier, model], load.inference_count)
        yield from (queue, compute, queued, inferences)
        for key, name, doc in (("used", "extproc_triton_gpu_memory_used_bytes", "GPU memory used (Triton)."),
                               ("total", "extproc_triton_gpu_memory_total_bytes", "GPU memory (Triton).")):
            if gpu[key]:
                family = GaugeMetricFamily(name, doc, labels=["gpu"])
                for uuid, value in sorted(gpu[key].items()):
                    family.add_metric([uuid], value)
                yield family


class WorkersCollector:
    """The parent's view of its workers: ``extproc_workers_alive`` and ``extproc_worker_restarts_total``.

    :param stats: any object with ``alive`` and ``restarts`` (``extproc.serving.server.WorkerStats``).
    """

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("extproc_workers_alive", "Worker processes alive.", value=self.stats.alive)
        yield CounterMetricFamily("extproc_worker_restarts", "Workers replaced after one died.",
                                  value=self.stats.restarts)
        yield CounterMetricFamily("extproc_worker_recycles", "Workers replaced after reaching "
                                  "server.max_streams_per_worker.", value=getattr(self.stats, "recycled", 0))


def start_metrics_server(port: int, host: str, path: str, *, triton_url: str | None = None,
                         model_tiers: dict[str, str] | None = None, worker_stats=None):
    """Serve the merged metrics of every worker (and Triton's, when configured; and the parent's
    view of its workers, given ``worker_stats``) on ``host:port``.

    :return: ``(server, thread)``; ``server.server_port`` is the bound port (0 picks one).
    """
    from prometheus_client import start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    if triton_url:
        registry.register(TritonCollector(triton_url, model_tiers or {}))
    if worker_stats is not None:
        registry.register(WorkersCollector(worker_stats))
    return start_http_server(port, addr=host, registry=registry)
