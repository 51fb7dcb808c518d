"""A tiny circuit breaker for optional shared state: after a failure, skip the store for a while.

A cache whose Redis is gone must not add a connection attempt (or a socket timeout) to every
request: after :meth:`Breaker.failed`, :attr:`Breaker.open` is True for ``cooldown`` seconds, and
the policy treats the store as absent (no cache). The first request after the cool-down tries
again; success closes the breaker. Failures are logged once per opening, not once per request.
"""

from __future__ import annotations

import logging
import time

__all__ = ["Breaker"]

log = logging.getLogger(__name__)


class Breaker:
    """Open for ``cooldown`` seconds after a failure; closed again after a success."""

    __slots__ = ("name", "cooldown", "_until", "failures")

    def __init__(self, name: str, cooldown: float = 1.0):
        self.name = name
        self.cooldown = cooldown
        self._until = 0.0
        self.failures = 0

    @property
    def open(self) -> bool:
        """True while the store should be left alone."""
        return self._until > 0.0 and time.monotonic() < self._until

    def failed(self, exc: BaseException) -> None:
        """The store failed: open (or keep open) for another cool-down."""
        self.failures += 1
        if self._until == 0.0:
            log.warning("%s: shared store unavailable (%s); degrading to no cache, retrying every %.1fs",
                        self.name, exc, self.cooldown)
        self._until = time.monotonic() + self.cooldown

    def ok(self) -> None:
        """The store answered: close."""
        if self._until:
            log.info("%s: shared store is back", self.name)
            self._until = 0.0
