"""Request log: one structured line per finished request on the ``extproc.requests`` logger."""

from __future__ import annotations

import json
import logging

from extproc.framework.hookspecs import hookimpl

log = logging.getLogger("extproc.requests")


@hookimpl
def extproc_request_finished(ctx):
    if not log.isEnabledFor(logging.INFO):
        return
    usage = ctx.usage
    log.info(json.dumps({
        "request_id": ctx.request_id,
        "path": ctx.path,
        "tenant": ctx.tenant,
        "workflow": ctx.workflow,
        "tier": ctx.tier,
        "reason": ctx.tier_reason,
        "status": ctx.response_status,
        "outcome": ctx.outcome,
        "stream": ctx.stream,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "cost_usd": ctx.cost_usd,
        "ms": round(ctx.elapsed_ms, 3),
        "degraded": ctx.degraded or None,
        "error": ctx.error,
    }, separators=(",", ":")))
