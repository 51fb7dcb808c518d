"""A steady, bounded load from the test itself, and what became of each request.

``with SteadyLoad(url, rate=60) as load: ...; report = load.stop()`` sends ``rate`` requests a
second (each on its own schedule, not waiting for the previous ones) until stopped, each with a
client timeout; a request that gets no answer within it counts as hung. The report counts them
by outcome and checks every failure's body is an OpenAI-style error.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class Outcome:
    sent_at: float  #: seconds since the load started
    status: int | None = None  #: None: no answer (connection error or hung)
    seconds: float = 0.0
    openai_error: bool = False  #: a non-200 whose body is {"error": {"message", "type", ...}}
    hung: bool = False
    error: str = ""
    tokens: int = 0  #: the answer's usage.total_tokens


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    duration: float = 0.0  #: from the first request sent to the last one ended
    sending: float = 0.0  #: from the first request sent to the last one sent

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def answered(self) -> int:
        return sum(1 for o in self.outcomes if o.status == 200)

    @property
    def by_status(self) -> Counter:
        return Counter("hung" if o.hung else (o.status if o.status is not None else "no answer")
                       for o in self.outcomes)

    @property
    def hung(self) -> int:
        return sum(1 for o in self.outcomes if o.hung)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def between(self, start: float, end: float) -> "LoadReport":
        """The requests sent in [start, end) seconds after the load started."""
        return LoadReport([o for o in self.outcomes if start <= o.sent_at < end], end - start, end - start)

    def summary(self) -> str:
        rate = self.sent / self.sending if self.sending else 0.0
        return (f"sent {self.sent} ({rate:.0f}/s), answered {self.answered}, "
                f"failed by status {dict(sorted(self.by_status.items(), key=str))}, hung {self.hung}")


class SteadyLoad:
    """Chat requests at a fixed rate in a thread of their own (see the module docstring)."""

    def __init__(self, base_url: str, *, rate: float = 60.0, timeout: float = 10.0, body=None,
                 headers: dict | None = None):
        self.base_url, self.rate, self.timeout = base_url.rstrip("/"), rate, timeout
        self.body = body or (lambda i: {"model": "small", "max_tokens": 2,
                                        "messages": [{"role": "user", "content": f"steady load {i}"}]})
        self.headers = headers or {}
        self.report = LoadReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.started = 0.0

    def __enter__(self) -> "SteadyLoad":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def stop(self) -> LoadReport:
        """Stop sending, wait for the requests in flight (each ends by its timeout at the latest)."""
        self._stop.set()
        self._thread.join(self.timeout + 30)
        return self.report

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:
            tasks = []
            for i in itertools.count():
                due = self.started + i / self.rate
                now = time.monotonic()
                if self._stop.is_set():
                    break
                if due > now:
                    await asyncio.sleep(due - now)
                tasks.append(asyncio.create_task(self._one(client, i, time.monotonic() - self.started)))
            self.report.sending = time.monotonic() - self.started
            await asyncio.gather(*tasks)
            self.report.duration = time.monotonic() - self.started

    async def _one(self, client: httpx.AsyncClient, i: int, sent_at: float) -> None:
        outcome = Outcome(sent_at)
        t0 = time.monotonic()
        try:
            r = await client.post(f"{self.base_url}/chat/completions", json=self.body(i), headers=self.headers)
            outcome.status = r.status_code
            if r.status_code == 200:
                try:
                    outcome.tokens = int(json.loads(r.content)["usage"]["total_tokens"])
                except (ValueError, KeyError, TypeError):
                    outcome.tokens = 0
            else:
                try:
                    err = json.loads(r.content)["error"]
                    outcome.openai_error = isinstance(err.get("message"), str) and "type" in err
                except (ValueError, KeyError, TypeError, AttributeError):
                    outcome.openai_error = False
                outcome.error = r.text[:200]
        except httpx.TimeoutException as exc:
            outcome.hung, outcome.error = True, repr(exc)
        except httpx.HTTPError as exc:
            outcome.error = repr(exc)
        outcome.seconds = time.monotonic() - t0
        self.report.outcomes.append(outcome)
