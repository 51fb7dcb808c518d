"""The simulation's workload inputs: the per-tier mix, token-length distributions, the diurnal
curve and non-homogeneous Poisson arrivals.

The mix is a plain input (:class:`WorkloadMix`): per tier, its share of the requests and the
distributions of prompt and completion tokens. The load runner can supply the gateway's
post-policy mix as a file (:func:`load_mix`): ``{"tiers": {"small": {"share": 0.4,
"prompt_tokens": {...}, "completion_tokens": {...}}, ...}}``, where a distribution is
``{"kind": "lognormal", "mean": 800, "cv": 0.9}`` or ``{"kind": "empirical", "samples": [...]}``
(e.g. the token counts the runner recorded).

Arrivals: a non-homogeneous Poisson process of rate ``base_rate_rps × scale × shape(t)``, where
``shape`` interpolates 24 hourly values linearly (periodic, normalised to a mean of 1 over the
day), drawn by thinning (Lewis and Shedler). Splitting a Poisson process by independent marks
gives independent Poisson processes, so each tier's arrivals are drawn on their own, with rate
``× share``: tiers are independent pools, simulated separately.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

KINDS = ("lognormal", "exponential", "constant", "uniform", "empirical")

#: A working-day curve (hour 0 = midnight): trough around 04:00, peak 10:00-15:00 (assumed shape).
DEFAULT_HOURLY = (0.30, 0.22, 0.18, 0.16, 0.16, 0.22, 0.40, 0.75, 1.30, 1.75, 1.95, 2.00,
                  1.90, 1.95, 2.00, 1.90, 1.70, 1.45, 1.15, 0.95, 0.80, 0.65, 0.50, 0.38)


@dataclass(frozen=True)
class TokenDist:
    """A token-length distribution.

    ``lognormal`` (``mean``, ``cv``: coefficient of variation), ``exponential`` (``mean``),
    ``constant`` (``mean``), ``uniform`` (``low``..``high``) or ``empirical`` (``samples``, drawn
    with replacement). ``low``/``high`` clip the others. ``integer`` rounds up to whole tokens
    (at least 1); ``integer=False`` keeps real values (the M/M/c check's exponential service).
    """

    kind: str = "lognormal"
    mean: float = 256.0
    cv: float = 1.0
    low: float | None = None
    high: float | None = None
    samples: tuple[float, ...] = ()
    integer: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "empirical" and not self.samples:
            raise ValueError("samples: an empirical distribution needs samples")
        if self.kind == "uniform" and (self.low is None or self.high is None or self.high < self.low):
            raise ValueError("low/high: a uniform distribution needs low <= high")
        if self.kind in ("lognormal", "exponential", "constant") and self.mean <= 0:
            raise ValueError("mean: must be > 0")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` draws (float array)."""
        if self.kind == "lognormal":
            sigma2 = math.log1p(self.cv ** 2)
            x = rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2), n)
        elif self.kind == "exponential":
            x = rng.exponential(self.mean, n)
        elif self.kind == "constant":
            x = np.full(n, float(self.mean))
        elif self.kind == "uniform":
            x = rng.uniform(self.low, self.high, n)
        else:
            x = rng.choice(np.asarray(self.samples, dtype=float), n)
        if self.low is not None or self.high is not None:
            x = np.clip(x, self.low, self.high)
        if self.integer:
            x = np.maximum(np.ceil(x), 1.0)
        return x

    @property
    def expected(self) -> float:
        """The mean (before clipping and rounding)."""
        if self.kind == "uniform":
            return (self.low + self.high) / 2
        if self.kind == "empirical":
            return float(np.mean(self.samples))
        return self.mean

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | float, where: str = "") -> "TokenDist":
        """From ``{"kind": ..., "mean": ...}`` (a bare number is a constant)."""
        if isinstance(d, (int, float)):
            return cls(kind="constant", mean=float(d))
        unknown = set(d) - {"kind", "mean", "cv", "low", "high", "samples", "integer"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        try:
            return cls(kind=d.get("kind", "lognormal"), mean=float(d.get("mean", 256.0)), cv=float(d.get("cv", 1.0)),
                       low=d.get("low"), high=d.get("high"), samples=tuple(float(x) for x in d.get("samples", ())),
                       integer=bool(d.get("integer", True)))
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None


@dataclass(frozen=True)
class TierMix:
    """One tier's part of the workload."""

    share: float
    prompt: TokenDist
    completion: TokenDist


@dataclass(frozen=True)
class WorkloadMix:
    """The requests' mix over the tiers (shares are normalised to sum to 1)."""

    tiers: Mapping[str, TierMix]
    source: str = "config"

    def __post_init__(self) -> None:
        total = sum(t.share for t in self.tiers.values())
        if not self.tiers or total <= 0 or any(t.share < 0 for t in self.tiers.values()):
            raise ValueError("tiers: shares must be >= 0 and not all 0")

    def share(self, tier: str) -> float:
        return self.tiers[tier].share / sum(t.share for t in self.tiers.values())

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], source: str = "config") -> "WorkloadMix":
        """From ``{"tiers": {name: {"share", "prompt_tokens", "completion_tokens"}}}`` (or the
        tiers mapping itself); ``prompt``/``completion`` are accepted for the last two."""
        tiers = d.get("tiers", d)
        if not isinstance(tiers, Mapping) or not tiers:
            raise ValueError(f"{source}: tiers: expected a mapping of tier name to its mix")
        out = {}
        for name, t in tiers.items():
            where = f"{source}: tiers.{name}"
            if not isinstance(t, Mapping) or "share" not in t:
                raise ValueError(f"{where}: needs 'share'")
            prompt = t.get("prompt_tokens", t.get("prompt"))
            completion = t.get("completion_tokens", t.get("completion"))
            if prompt is None or completion is None:
                raise ValueError(f"{where}: needs 'prompt_tokens' and 'completion_tokens'")
            out[str(name)] = TierMix(float(t["share"]), TokenDist.from_mapping(prompt, f"{where}.prompt_tokens"),
                                     TokenDist.from_mapping(completion, f"{where}.completion_tokens"))
        return cls(out, source)


def load_mix(path: str | Path) -> WorkloadMix:
    """A :class:`WorkloadMix` from a JSON or YAML file (see the module docstring)."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping")
    return WorkloadMix.from_mapping(data, str(path))


@dataclass(frozen=True)
class Diurnal:
    """The day's arrival-rate shape: ``hourly`` values (any number of equal steps over the day,
    24 for hours), linear between step starts, periodic, normalised to a mean of 1; ``day_s``
    stretches it (86,400 s: a real day)."""

    hourly: Sequence[float] = DEFAULT_HOURLY
    day_s: float = 86_400.0
    _norm: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        h = [float(x) for x in self.hourly]
        if len(h) < 1 or min(h) < 0 or sum(h) <= 0:
            raise ValueError("diurnal.hourly: needs values >= 0, not all 0")
        mean = sum(h) / len(h)
        object.__setattr__(self, "_norm", tuple(x / mean for x in h))

    def factor(self, t: np.ndarray | float) -> np.ndarray:
        """The rate multiplier at time(s) ``t`` (seconds since midnight)."""
        h = np.asarray(self._norm + self._norm[:1])
        pos = (np.asarray(t, dtype=float) % self.day_s) / self.day_s * len(self._norm)
        i = np.floor(pos).astype(int)
        return h[i] + (pos - i) * (h[i + 1] - h[i])

    @property
    def max_factor(self) -> float:
        return max(self._norm)

    @property
    def peak_time(self) -> float:
        """Start of the first step with the highest value (seconds)."""
        return self._norm.index(self.max_factor) * self.day_s / len(self._norm)


def arrival_times(rate_rps: float, diurnal: Diurnal, t0: float, t1: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times in ``[t0, t1)`` of a Poisson process of rate ``rate_rps × diurnal.factor(t)``
    (thinning a homogeneous process at the maximum rate)."""
    lam_max = rate_rps * diurnal.max_factor
    if lam_max <= 0 or t1 <= t0:
        return np.empty(0)
    n = rng.poisson(lam_max * (t1 - t0))
    t = np.sort(rng.uniform(t0, t1, n))
    keep = rng.uniform(0.0, 1.0, n) * lam_max < rate_rps * diurnal.factor(t)
    return t[keep]


def constant_arrivals(rate_rps: float, t0: float, t1: float, rng: np.random.Generator) -> np.ndarray:
    """A homogeneous Poisson process of rate ``rate_rps`` in ``[t0, t1)``."""
    n = rng.poisson(rate_rps * (t1 - t0))
    return np.sort(rng.uniform(t0, t1, n))
