"""Log a store outage once, not once per request.

With Redis gone every admission fails the same way; a warning per request (hundreds a second)
buries everything else in the log. :class:`OutageLog` logs the first failure, counts the requests
it touched while the store stays down, and logs one line when an admission succeeds again.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("extproc_plugins.budgets.budgets")


class OutageLog:
    """One warning when the store goes away, one when it is back (with the requests affected)."""

    __slots__ = ("policy", "down_since", "affected")

    def __init__(self, policy: str):
        self.policy = policy  #: on_store_unavailable: "admit" or "reject"
        self.down_since: float | None = None
        self.affected = 0

    def down(self, exc: BaseException) -> None:
        """An admission found the store unavailable."""
        self.affected += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("budgets: store unavailable at admission (on_store_unavailable: %s): %s; "
                        "requests are %s until it is back (logged once)", self.policy, exc,
                        "admitted unchecked" if self.policy == "admit" else "refused with 503")

    def up(self) -> None:
        """An admission reached the store."""
        if self.down_since is not None:
            log.warning("budgets: store back after %.1fs; %d request(s) were %s meanwhile",
                        time.monotonic() - self.down_since, self.affected,
                        "admitted unchecked" if self.policy == "admit" else "refused with 503")
            self.down_since, self.affected = None, 0
