"""What a client may ask of the caches, read from its request headers (pure, no I/O).

===========================  ==================================================================
header                       effect
===========================  ==================================================================
``Cache-Control: no-cache``  do not answer from a cache or from an identical in-flight request;
                             go upstream (the fresh answer may be stored). ``Pragma: no-cache``
                             means the same.
``Cache-Control: no-store``  do not store this request's answer (a stored answer may be served).
``Cache-Control: max-age=N`` serve only a stored answer at most N seconds old (``max-age=0`` is
                             ``no-cache``).
``X-Cache-TTL: N``           store this answer for N seconds (clamped to the policy's maximum;
                             0 = do not store).
===========================  ==================================================================

Unknown ``Cache-Control`` directives are ignored (as HTTP caches do); a malformed ``max-age`` or
``X-Cache-TTL`` is the client's error: 400, OpenAI-style, naming the header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from extproc.formats.openai import OpenAIError

__all__ = ["CacheDirectives", "parse_cache_headers", "TTL_HEADER", "CacheTTL"]

TTL_HEADER = "x-cache-ttl"


@dataclass(frozen=True, slots=True)
class CacheDirectives:
    """The client's wishes for this request."""

    no_cache: bool = False  # do not reuse a stored or in-flight answer
    no_store: bool = False  # do not store this answer
    max_age: float | None = None  # reuse only answers at most this old (seconds)
    ttl: float | None = None  # store for this long (seconds), before the policy's clamp


NONE = CacheDirectives()


def _seconds(value: str, what: str, code: str) -> float:
    try:
        n = float(value.strip())
    except ValueError:
        n = math.nan
    if not math.isfinite(n) or n < 0:
        raise OpenAIError(400, f"Invalid {what}: expected a non-negative number of seconds, got {value!r}.",
                          code=code)
    return n


def parse_cache_headers(headers: dict[str, str]) -> CacheDirectives:
    """Read ``Cache-Control``, ``Pragma`` and ``X-Cache-TTL``; raise OpenAIError(400) on bad values."""
    cc = headers.get("cache-control")
    pragma = headers.get("pragma")
    ttl_header = headers.get(TTL_HEADER)
    if cc is None and pragma is None and ttl_header is None:
        return NONE
    no_cache = no_store = False
    max_age = ttl = None
    if cc:
        for part in cc.split(","):
            name, _, value = part.strip().partition("=")
            name = name.strip().lower()
            if name == "no-cache":
                no_cache = True
            elif name == "no-store":
                no_store = True
            elif name == "max-age":
                max_age = _seconds(value.strip().strip('"'), "Cache-Control max-age", "invalid_cache_control")
    if pragma and "no-cache" in pragma.lower() and cc is None:
        no_cache = True
    if max_age == 0:
        no_cache = True
    if ttl_header is not None:
        ttl = _seconds(ttl_header, f"{TTL_HEADER} header", "invalid_cache_ttl")
    return CacheDirectives(no_cache, no_store, max_age, ttl)


class CacheTTL(BaseModel):
    """How long answers are kept (a settings block of the caching policies).

    The most specific configured value wins: tenant, then workflow, then route (request path),
    then ``default_seconds``; 0 means "do not store". A client's ``X-Cache-TTL`` replaces it,
    clamped to ``max_seconds``, but cannot switch storing back on where the policy says 0.
    """

    model_config = ConfigDict(extra="forbid")

    default_seconds: float = Field(3600.0, ge=0)
    max_seconds: float = Field(86400.0, ge=0, description="ceiling for the client's X-Cache-TTL")
    by_route: dict[str, float] = Field(default_factory=dict, description="request path -> seconds")
    by_workflow: dict[str, float] = Field(default_factory=dict)
    by_tenant: dict[str, float] = Field(default_factory=dict)

    def resolve(self, *, path: str, workflow: str | None, tenant: str, directives: CacheDirectives) -> float:
        """The TTL for one answer (0: do not store it)."""
        if directives.no_store:
            return 0.0
        ttl = self.by_tenant.get(tenant)
        if ttl is None and workflow is not None:
            ttl = self.by_workflow.get(workflow)
        if ttl is None:
            ttl = self.by_route.get(path, self.default_seconds)
        if ttl > 0 and directives.ttl is not None:
            ttl = min(directives.ttl, self.max_seconds)
        return ttl
