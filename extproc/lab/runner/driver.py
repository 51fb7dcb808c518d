"""The open-loop driver: every planned request leaves at its planned time, whatever the answers.

Open loop is what production traffic does: users do not wait for the previous user's answer, so
a slow endpoint gets a growing backlog (and, through the clients' timeouts, retry storms) rather
than a politely lower arrival rate. One scheduler task sleeps until each request's ``at`` and
starts a task for it; that task sends attempts by the request's :class:`RetryPolicy` (a timeout, a
transport error or a status in ``retry_on_status`` is retried after ``backoff_s *
backoff_factor ** (n - 1)`` seconds, or the answer's ``Retry-After`` when it gives one of at most
60 s, as the OpenAI SDK does). Each retry carries ``x-stainless-retry-count: n``.

Bounds: requests planned at or after ``duration`` are not sent, nor more than ``max_requests``;
what is still running ``drain_s`` seconds after ``duration`` is cancelled and recorded as
``unfinished`` (its attempt in progress with ``error="cancelled"``). Connections: one httpx pool, HTTP/1.1 keep-alive, large enough that the pool
never queues a request (the send lag, actual against planned start, is recorded per request).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import httpx

from extproc.lab.runner.exchange import send
from extproc.lab.runner.records import RequestResult
from extproc.lab.workload.plan import PlannedRequest, RetryPolicy

MAX_RETRY_AFTER_S = 60.0


class Progress(Protocol):
    """What the driver tells a progress display (:class:`extproc.lab.runner.progress.RichProgress`)."""

    def started(self, result: RequestResult) -> None: ...

    def finished(self, result: RequestResult) -> None: ...


class _NoProgress:
    def started(self, result: RequestResult) -> None:
        pass

    def finished(self, result: RequestResult) -> None:
        pass


def origin_of(base_url: str) -> str:
    """``http://host:port`` from a base URL (``.../v1`` accepted: the plan's endpoints carry ``/v1``)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def backoff(policy: RetryPolicy, retry: int, retry_after: str | None = None) -> float:
    """Seconds to wait before retry number ``retry`` (1-based)."""
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = -1.0
        if 0 <= seconds <= MAX_RETRY_AFTER_S:
            return seconds
    return policy.backoff_s * policy.backoff_factor ** (retry - 1)


def select(plan: Sequence[PlannedRequest], duration: float, max_requests: int | None = None) -> list[PlannedRequest]:
    """The requests a run sends: planned before ``duration``, at most ``max_requests``, in time order."""
    chosen = sorted((r for r in plan if r.at < duration), key=lambda r: (r.at, r.index))
    return chosen[:max_requests] if max_requests is not None else chosen


@dataclass
class RunOutcome:
    """What :func:`drive` returns: the results in plan order, and the run's wall times."""

    results: list[RequestResult]
    wall_s: float  #: start to the last request finished (or cancelled)
    started_unix: float


def _retryable(attempt, policy: RetryPolicy) -> bool:
    if attempt.status is None:
        return True  # timeout, transport error
    return attempt.status in policy.retry_on_status


async def _one(client: httpx.AsyncClient, origin: str, request: PlannedRequest, result: RequestResult,
               t0: float, progress: Progress) -> None:
    policy = request.retry
    url = origin + request.endpoint
    progress.started(result)
    try:
        for number in range(policy.retries + 1):
            attempt = await send(client, url, request.body, request.headers, stream=request.stream,
                                 number=number, timeout_s=policy.timeout_s, t0=t0, attempts=result.attempts)
            if attempt.ok:
                result.outcome = "ok"
                break
            if number == policy.retries or not _retryable(attempt, policy):
                result.outcome = "error"
                break
            await asyncio.sleep(backoff(policy, number + 1, attempt.headers.get("retry-after")))
        result.finished = time.perf_counter() - t0
    finally:
        progress.finished(result)


async def drive(plan: Sequence[PlannedRequest], base_url: str, *, duration: float, max_requests: int | None = None,
                drain_s: float = 15.0, max_connections: int = 1024, progress: Progress | None = None,
                client: httpx.AsyncClient | None = None) -> RunOutcome:
    """Replay ``plan`` against ``base_url`` open-loop; see the module docstring.

    :param client: an httpx client to use (tests); by default one is made for the run.
    """
    progress = progress or _NoProgress()
    chosen = select(plan, duration, max_requests)
    results = [RequestResult.planned(r) for r in chosen]
    origin = origin_of(base_url)
    own = client is None
    if own:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                              keepalive_expiry=30.0)
        client = httpx.AsyncClient(limits=limits, http1=True, http2=False, trust_env=False)
    tasks: list[asyncio.Task] = []
    started_unix = time.time()
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    origin_loop = loop.time()

    async def schedule() -> None:
        for request, result in zip(chosen, results):
            delay = origin_loop + request.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, origin, request, result, t0, progress)))

    try:
        scheduler = asyncio.create_task(schedule())
        end = origin_loop + duration + drain_s
        try:
            await asyncio.wait_for(asyncio.shield(scheduler), max(0.0, end - loop.time()))
        except asyncio.TimeoutError:
            scheduler.cancel()
        pending = [t for t in tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, end - loop.time()))
        for task in tasks:
            if not task.done():
                task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for failure in outcomes:  # a bug of the driver's, not a request's failure: say it
            if isinstance(failure, Exception):
                raise failure
    finally:
        if own:
            await client.aclose()
    wall = max([r.finished for r in results if r.finished is not None] or [0.0])
    if any(r.outcome == "unfinished" for r in results):
        wall = time.perf_counter() - t0
    return RunOutcome(results=results, wall_s=wall, started_unix=started_unix)
