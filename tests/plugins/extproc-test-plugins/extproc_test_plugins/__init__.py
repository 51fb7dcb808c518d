"""Plugins that raise on demand, so the end-to-end tests can see each failure policy at work."""

from extproc import hookimpl


class _Raiser:
    trigger = ""

    @hookimpl
    def extproc_request_parsed(self, ctx):
        messages = ctx.request.messages or []
        if any(self.trigger in m.text for m in messages):
            raise RuntimeError(f"{type(self).__name__} raised as asked")


class RaiserClosed(_Raiser):
    """Raises when a message contains 'raise-closed' (configured fail_closed in the tests)."""

    trigger = "raise-closed"


class RaiserOpen(_Raiser):
    """Raises when a message contains 'raise-open' (configured fail_open in the tests)."""

    trigger = "raise-open"


class Tagger:
    """Sets ctx.tenant / ctx.workflow from the x-test-tenant / x-test-workflow request headers
    (what an auth policy would do), so tests can drive per-tenant and per-workflow accounting."""

    @hookimpl
    def extproc_request_headers(self, ctx):
        ctx.tenant = ctx.headers.get("x-test-tenant", ctx.tenant)
        ctx.workflow = ctx.headers.get("x-test-workflow", ctx.workflow)


class SoftBudgetMarker:
    """Marks the request over its soft budget (ctx.over_soft_budget, what the budget policy sets)
    when it carries ``x-test-over-soft-budget: 1``, so routing tests can see the downgrade."""

    @hookimpl
    def extproc_request_parsed(self, ctx):
        if ctx.headers.get("x-test-over-soft-budget") == "1":
            ctx.over_soft_budget = True
            ctx.budget_status = "soft_limit"


class SlowComplete:
    """Waits in ``extproc_response_complete`` when a message contains ``slow-complete-<seconds>s``:
    a request whose answer takes longer than Envoy's 2 s per-message timeout to finish (the caching
    tests use it as a slow coalescing leader)."""

    @hookimpl
    async def extproc_response_complete(self, ctx):
        import asyncio
        import re

        for m in ctx.request.messages or []:
            found = re.search(r"slow-complete-(\d+(?:\.\d+)?)s", m.text)
            if found:
                await asyncio.sleep(float(found.group(1)))
                return
