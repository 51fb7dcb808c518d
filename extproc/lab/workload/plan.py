"""What the workload generator produces and the load runner consumes: planned requests.

A run is a list of :class:`PlannedRequest` sorted by ``at``. The plan is open-loop: a follow-up turn
is planned from the previous turn's planned time plus think time, and its history holds the
generator's own assistant text, so the same seed gives the same requests whatever the endpoint
answers. Retries are not planned: the runner applies each request's :class:`RetryPolicy` when an
attempt times out or fails, as the client would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: How a request relates to earlier ones (for the report's "what the caches could have saved").
KINDS = ("fresh", "repeat", "paraphrase", "duplicate", "followup")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The client's own retries: an attempt without an answer within ``timeout_s``, or a 429/5xx,
    is sent again after ``backoff_s * backoff_factor ** (attempt - 1)`` seconds, ``retries`` times."""

    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5
    backoff_factor: float = 2.0
    retry_on_status: tuple[int, ...] = (429, 500, 502, 503, 504)


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request of a run, as the client will send it (before any retry)."""

    at: float  #: seconds after the start of the run (already scaled)
    index: int  #: position in the plan (stable for a seed)
    tenant: str
    workflow: str
    service: str  #: the calling service (the same document from two services is a duplicate)
    session: str
    turn: int  #: 0 for a session's first request
    endpoint: str  #: "/v1/chat/completions" or "/v1/completions"
    body: dict  #: the OpenAI request body; ``model`` is what the workload asks for (e.g. "auto")
    stream: bool
    difficulty: str  #: the tier the request truly needs ("small", "medium", "large")
    kind: str  #: one of KINDS
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    headers: dict = field(default_factory=dict)  #: e.g. x-tenant-id, x-workflow
    prompt_tokens: int = 0  #: the generator's estimate of the prompt's tokens (every message)
    origin: int | None = None  #: the ``index`` this request repeats, paraphrases or duplicates (None otherwise)
