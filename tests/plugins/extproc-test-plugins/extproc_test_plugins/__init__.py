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
