"""What the runner measures: one :class:`Attempt` per HTTP exchange, one :class:`RequestResult` per
planned request (its attempts, the client's retries included), written as one JSON line each.

Times are seconds; ``started`` is measured from the start of the run (the plan's time 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from extproc.lab.workload.plan import PlannedRequest

#: Response headers captured on every attempt: the gateway's own (``x-extproc-*``, set in
#: extproc/framework/lifecycle.py and by the plugins: tier and its reason, cache status and
#: similarity, budget status, tokens cut by context caps, documents kept, degraded plugins) and
#: the standard ones that explain an answer (``retry-after`` of a 429/503, ``age`` of a cached one).
CAPTURED_HEADERS = (
    "x-extproc-tier", "x-extproc-tier-reason", "x-extproc-request-id", "x-extproc-cache",
    "x-extproc-cache-similarity", "x-extproc-budget", "x-extproc-tokens-cut", "x-extproc-documents",
    "x-extproc-degraded", "retry-after", "age",
)

#: ``x-extproc-cache`` values of an answer given without a new upstream generation.
HIT_STATUSES = frozenset({"hit", "semantic_hit", "coalesced", "idempotent"})

#: Outcomes of a request: ``ok`` (a 2xx answer in the end), ``error`` (its last attempt failed:
#: a non-2xx status, a timeout or a transport error, and no retry left), ``unfinished`` (still
#: running when the run's time was up; counted apart, never as an error or a success).
OUTCOMES = ("ok", "error", "unfinished")


@dataclass(slots=True)
class Attempt:
    """One HTTP exchange of a request (the first try or a client retry)."""

    number: int  #: 0 for the first try, N for the N-th retry (sent as ``x-stainless-retry-count: N``)
    started: float  #: seconds after the start of the run
    status: int | None = None  #: HTTP status; None without an answer (timeout, transport error)
    latency_s: float | None = None  #: send to last byte
    ttft_s: float | None = None  #: send to the first content (SSE: first ``data:`` chunk with text; JSON: latency)
    prompt_tokens: int | None = None  #: from ``usage`` (streams ask for it with ``stream_options.include_usage``)
    completion_tokens: int | None = None
    chunks: int = 0  #: SSE chunks with content
    headers: dict[str, str] = field(default_factory=dict)  #: the CAPTURED_HEADERS present
    error: str | None = None  #: "timeout", "transport: ...", the OpenAI error ``code``/``type``, "stream: ...",
    #: "cancelled" (still running when the run ended)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and self.error is None

    @property
    def cache(self) -> str | None:
        return self.headers.get("x-extproc-cache")

    @property
    def upstream_call(self) -> bool:
        """Whether the gateway went upstream for it (an answer not served from a cache layer)."""
        return self.status is not None and self.cache not in HIT_STATUSES


@dataclass(slots=True)
class RequestResult:
    """A planned request and what the client saw of it, retries included."""

    index: int
    at: float  #: planned send time (seconds after the start)
    tenant: str
    workflow: str
    service: str
    session: str
    turn: int
    endpoint: str
    model: str  #: what the request asked for
    stream: bool
    difficulty: str
    kind: str
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str = "unfinished"  #: one of OUTCOMES
    finished: float | None = None  #: seconds after the start, when the last attempt ended

    @classmethod
    def planned(cls, request: PlannedRequest) -> "RequestResult":
        return cls(index=request.index, at=request.at, tenant=request.tenant, workflow=request.workflow,
                   service=request.service, session=request.session, turn=request.turn,
                   endpoint=request.endpoint, model=str(request.body.get("model")), stream=request.stream,
                   difficulty=request.difficulty, kind=request.kind)

    @property
    def final(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def retries(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def send_lag_s(self) -> float | None:
        """How late the first attempt left against its planned time (the driver keeping up)."""
        return self.attempts[0].started - self.at if self.attempts else None

    @property
    def latency_s(self) -> float | None:
        """What the client waited: first send to the final answer's last byte (backoff included)."""
        if self.finished is None or not self.attempts:
            return None
        return self.finished - self.attempts[0].started

    @property
    def ttft_s(self) -> float | None:
        """First send to the first content of the answer that succeeded (retries included)."""
        final = self.final
        if final is None or not final.ok or final.ttft_s is None:
            return None
        return final.started + final.ttft_s - self.attempts[0].started

    def to_json(self) -> dict:
        """The JSON line: every field, the attempts, and the derived numbers the report reads."""
        out = asdict(self)
        final = self.final
        out.update(
            status=final.status if final else None,
            retries=self.retries,
            latency_s=self.latency_s,
            ttft_s=self.ttft_s,
            send_lag_s=self.send_lag_s,
            tier=final.headers.get("x-extproc-tier") if final else None,
            cache=final.cache if final else None,
            budget=final.headers.get("x-extproc-budget") if final else None,
            prompt_tokens=final.prompt_tokens if final and final.ok else None,
            completion_tokens=final.completion_tokens if final and final.ok else None,
        )
        return out
