"""The workload model: who calls, what they send and how often, as a validated YAML file.

``load_workload(path_or_text)`` parses and validates a workload (the schema below, every key
documented in ``extproc/lab/workload/README.md``). Unknown keys are refused, and every error names
the key it is about::

    workflows.visit_summary.prompt_tokens.mean: must be > 0

Shipped examples: :func:`examples_dir`, :func:`example` (``clinical``, ``support``, ``backoffice``).
"""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from extproc.lab.workload.plan import RetryPolicy

TIERS = ("small", "medium", "large")
DOMAIN_NAMES = ("clinical", "support", "backoffice", "generic")

__all__ = [
    "TIERS", "WorkloadError", "Workload", "Workflow", "Tenant", "Arrivals", "LogNormal", "Turns",
    "Sessions", "Mix", "PerTier", "Documents", "Repeats", "Paraphrases", "Duplicates", "DelayRange",
    "Retry", "ContextWindows", "load_workload", "examples_dir", "example", "example_names",
]


class WorkloadError(ValueError):
    """A workload that cannot be loaded; ``errors`` holds ``(key path, message)`` pairs."""

    def __init__(self, message: str, errors: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.errors = errors or []


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogNormal(_Strict):
    """A lognormal distribution by its own mean and standard deviation (not those of its log),
    clipped to ``[min, max]``; ``sd: 0`` is the constant ``mean``."""

    mean: float = Field(gt=0)
    sd: float = Field(0.0, ge=0)
    min: float = Field(0.0, ge=0)
    max: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max:g}) must be >= min ({self.min:g})")
        return self

    def sample(self, rng) -> float:
        """One draw with ``rng`` (a ``random.Random``)."""
        if self.sd == 0:
            value = self.mean
        else:
            sigma2 = math.log1p((self.sd / self.mean) ** 2)
            value = rng.lognormvariate(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2))
        value = max(value, self.min)
        return min(value, self.max) if self.max is not None else value


class Turns(_Strict):
    """Requests per session: 1 + a geometric number of follow-ups with this mean, capped at ``max``."""

    mean: float = Field(1.0, ge=1)
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _bounds(self):
        if self.mean > self.max:
            raise ValueError(f"mean ({self.mean:g}) must be <= max ({self.max})")
        return self

    def sample(self, rng) -> int:
        """One draw with ``rng``."""
        if self.mean <= 1:
            return 1
        p = 1.0 / self.mean  # the chance that a turn is the session's last
        n = 1
        while n < self.max and rng.random() >= p:
            n += 1
        return n


class Mix(_Strict):
    """Shares of requests that truly need each tier (sum 1)."""

    small: float = Field(0.0, ge=0, le=1)
    medium: float = Field(0.0, ge=0, le=1)
    large: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.small + self.medium + self.large
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"shares must sum to 1 (got {total:g})")
        return self

    def pick(self, rng) -> str:
        """A tier drawn with ``rng``."""
        u = rng.random()
        if u < self.small:
            return "small"
        return "medium" if u < self.small + self.medium else ("large" if self.large > 0 else "medium")


class PerTier(_Strict):
    """Texts per tier (replacing the domain's own for the tiers given)."""

    small: list[str] = Field(default_factory=list)
    medium: list[str] = Field(default_factory=list)
    large: list[str] = Field(default_factory=list)


class Sessions(_Strict):
    """Multi-turn sessions: how many requests, how long the user thinks between them."""

    turns: Turns = Turns()
    think_time_s: LogNormal = LogNormal(mean=20.0, sd=10.0, min=2.0, max=120.0)
    history: int | None = Field(None, ge=0, description="previous turns kept after the first (None: all)")


class Documents(_Strict):
    """Attached reference documents: a pool of ``pool`` documents of ``tokens`` tokens each; a
    session's first request attaches one (uniformly) with probability ``attach``."""

    pool: int = Field(0, ge=0)
    tokens: int = Field(400, gt=0)
    attach: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _pool(self):
        if self.attach > 0 and self.pool == 0:
            raise ValueError("attach > 0 needs a pool of at least 1 document")
        return self


class Repeats(_Strict):
    """Recurring questions: with probability ``share`` a session opens with question k of a pool of
    ``pool``, k drawn with probability proportional to ``k ** -zipf`` (the same body every time)."""

    share: float = Field(0.0, ge=0, le=1)
    pool: int = Field(100, ge=1)
    zipf: float = Field(1.1, ge=0)


class Paraphrases(_Strict):
    """With probability ``share`` a session opens with a rewording of a recurring question (drawn
    like a repeat): an exact cache misses, a semantic cache may hit. ``variants``: how many
    rewordings each question has (a user asking again may repeat one exactly); None: every
    paraphrase is worded anew."""

    share: float = Field(0.0, ge=0, le=1)
    variants: int | None = Field(None, ge=1)


class DelayRange(_Strict):
    """A delay drawn log-uniformly in ``[min, max]`` seconds."""

    min: float = Field(0.02, gt=0)
    max: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max < self.min:
            raise ValueError(f"max ({self.max:g}) must be >= min ({self.min:g})")
        return self

    def sample(self, rng) -> float:
        """One draw with ``rng``."""
        return math.exp(rng.uniform(math.log(self.min), math.log(self.max)))


class Duplicates(_Strict):
    """With probability ``share`` a request is also sent, with the identical body, by another of the
    workflow's services ``delay_s`` later."""

    share: float = Field(0.0, ge=0, le=1)
    delay_s: DelayRange = DelayRange()


class Retry(_Strict):
    """The client's retry policy (:class:`~extproc.lab.workload.plan.RetryPolicy`)."""

    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    backoff_factor: float = Field(2.0, ge=1)
    retry_on_status: list[int] = Field(default_factory=lambda: [429, 500, 502, 503, 504])

    def policy(self) -> RetryPolicy:
        """The plan's frozen form."""
        return RetryPolicy(timeout_s=self.timeout_s, retries=self.retries, backoff_s=self.backoff_s,
                           backoff_factor=self.backoff_factor, retry_on_status=tuple(self.retry_on_status))


class Tenant(_Strict):
    """A tenant (the runner authenticates each as itself)."""

    description: str = ""


class Workflow(_Strict):
    """One kind of call: who sends it, what it looks like, how sessions unfold."""

    share: float = Field(gt=0, le=1, description="share of the sessions")
    tenant: str | None = None
    tenants: dict[str, float] | None = Field(None, description="tenant -> share of this workflow's sessions")
    services: list[str] = Field(default_factory=lambda: ["app"], min_length=1)
    domain: Literal["clinical", "support", "backoffice", "generic"] = "generic"
    endpoint: Literal["chat", "completions"] = "chat"
    stream: float = Field(0.0, ge=0, le=1, description="share of requests streamed (SSE)")
    stream_usage: bool = True
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int | None = Field(64, ge=1)
    model: str = Field("auto", min_length=1)
    system_prompt: str | None = None
    prompt_tokens: LogNormal
    documents: Documents = Documents()
    sessions: Sessions = Sessions()
    difficulty: Mix = Mix(medium=1.0)
    followup_difficulty: Mix | None = None
    instructions: PerTier | None = None
    followups: PerTier | None = None
    repeats: Repeats = Repeats()
    paraphrases: Paraphrases = Paraphrases()
    duplicates: Duplicates = Duplicates()
    retry: Retry = Retry()

    @model_validator(mode="after")
    def _consistent(self):
        if (self.tenant is None) == (self.tenants is None):
            raise ValueError("give exactly one of tenant or tenants")
        if self.tenants is not None:
            if not self.tenants or any(v <= 0 for v in self.tenants.values()):
                raise ValueError("tenants: every share must be > 0")
            if abs(sum(self.tenants.values()) - 1.0) > 1e-6:
                raise ValueError(f"tenants: shares must sum to 1 (got {sum(self.tenants.values()):g})")
        if self.repeats.share + self.paraphrases.share > 1.0 + 1e-9:
            raise ValueError("repeats.share + paraphrases.share must be <= 1")
        if self.duplicates.share > 0 and len(set(self.services)) < 2:
            raise ValueError("duplicates.share > 0 needs at least two distinct services")
        return self

    def tenant_shares(self) -> dict[str, float]:
        """Tenant -> share of the sessions."""
        return dict(self.tenants) if self.tenants is not None else {self.tenant: 1.0}


class Arrivals(_Strict):
    """Session arrivals over the compressed day: a Poisson process of rate
    ``base_per_s * multiplier(fraction of the day)`` (times the run's scale).

    The multiplier is either a cosine day (``trough_factor`` to ``peak_factor``, highest at
    ``peaks_at``, lowest half a day away) or ``curve``: ``[fraction, multiplier]`` points,
    interpolated linearly (held flat before the first and after the last)."""

    base_per_s: float = Field(gt=0)
    peak_factor: float = Field(1.0, gt=0)
    trough_factor: float = Field(1.0, gt=0)
    peaks_at: float = Field(0.5, ge=0, le=1)
    curve: list[tuple[float, float]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _shape(self):
        if self.curve is not None:
            shape = {"peak_factor", "trough_factor", "peaks_at"} & self.model_fields_set
            if shape:
                raise ValueError(f"give either curve or {', '.join(sorted(shape))}, not both")
            xs = [x for x, _ in self.curve]
            if any(not 0 <= x <= 1 for x in xs) or any(b <= a for a, b in zip(xs, xs[1:])):
                raise ValueError("curve: fractions of the day must increase, within [0, 1]")
            if any(m < 0 for _, m in self.curve) or max(m for _, m in self.curve) <= 0:
                raise ValueError("curve: multipliers must be >= 0, one of them > 0")
        elif self.trough_factor > self.peak_factor:
            raise ValueError("trough_factor must be <= peak_factor")
        return self

    def multiplier(self, fraction: float) -> float:
        """The rate multiplier at ``fraction`` (0..1) of the day."""
        if self.curve is None:
            wave = (1.0 + math.cos(2.0 * math.pi * (fraction - self.peaks_at))) / 2.0
            return self.trough_factor + (self.peak_factor - self.trough_factor) * wave
        pts = self.curve
        if fraction <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if fraction <= x1:
                return y0 + (y1 - y0) * (fraction - x0) / (x1 - x0)
        return pts[-1][1]

    def max_multiplier(self) -> float:
        """The highest multiplier of the day."""
        return self.peak_factor if self.curve is None else max(m for _, m in self.curve)

    def mean_multiplier(self, steps: int = 1000) -> float:
        """The day's average multiplier (expected sessions = base_per_s * mean * duration * scale)."""
        return sum(self.multiplier((i + 0.5) / steps) for i in range(steps)) / steps


class ContextWindows(_Strict):
    """Context window (tokens) of each tier: a request's prompt plus ``max_tokens`` must fit the
    window of the tier it needs (the default configuration's tiers)."""

    small: int = Field(2048, gt=0)
    medium: int = Field(4096, gt=0)
    large: int = Field(8192, gt=0)


class Workload(_Strict):
    """A whole workload: the root of the YAML file."""

    name: str = Field(min_length=1)
    description: str = ""
    seed: int = 0
    duration_s: float = Field(gt=0, description="the compressed day at 1x, seconds")
    arrivals: Arrivals
    tenants: dict[str, Tenant] = Field(min_length=1)
    workflows: dict[str, Workflow] = Field(min_length=1)
    context_windows: ContextWindows = ContextWindows()

    @model_validator(mode="after")
    def _references(self):
        total = sum(w.share for w in self.workflows.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"workflows: shares must sum to 1 (got {total:g})")
        known = ", ".join(sorted(self.tenants))
        for name, w in self.workflows.items():
            for tenant in w.tenant_shares():
                if tenant not in self.tenants:
                    key = "tenant" if w.tenant is not None else f"tenants.{tenant}"
                    raise ValueError(f"workflows.{name}.{key}: unknown tenant {tenant!r} (known: {known})")
        return self


# -- loading ------------------------------------------------------------------------------------

_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "extra_forbidden": "unknown key",
    "missing": "required",
    "too_short": "must have at least {min_length} item(s)",
}


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict) -> str:
    template = _MESSAGES.get(err["type"])
    if template is not None:
        ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in (err.get("ctx") or {}).items()}
        try:
            return template.format(**ctx)
        except (KeyError, IndexError):
            pass
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


_KEY = re.compile(r"^[A-Za-z_][\w.\[\]-]*$")


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        path, msg = _path(tuple(err["loc"])), _message(err)
        head, sep, rest = msg.partition(": ")
        if sep and _KEY.match(head):  # a check across keys names the key below the model it is on
            path, msg = (f"{path}.{head}" if path else head), rest
        out.append((path or "(root)", msg))
    return out


def load_workload(source: str | Path | Mapping[str, Any]) -> Workload:
    """A validated :class:`Workload` from a YAML file path, YAML text, or an already parsed mapping.

    Raises :class:`WorkloadError` whose message is one ``key.path: problem`` per error.
    """
    where = ""
    if isinstance(source, Mapping):
        data: Any = source
    else:
        text = str(source)
        if isinstance(source, Path) or ("\n" not in text and text.endswith((".yaml", ".yml"))):
            path = Path(text)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise WorkloadError(f"{path}: cannot read: {exc.strerror or exc}") from None
            where = f"{path}: "
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise WorkloadError(f"{where}invalid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise WorkloadError(f"{where}a workload is a mapping of keys (name, duration_s, arrivals, ...)")
    try:
        return Workload.model_validate(dict(data))
    except ValidationError as exc:
        errors = _errors(exc)
        raise WorkloadError(where + "; ".join(f"{p}: {m}" for p, m in errors), errors) from None


def examples_dir() -> Path:
    """The folder of the shipped example workloads."""
    return Path(str(resources.files("extproc.lab.workload").joinpath("examples")))


def example_names() -> list[str]:
    """Names of the shipped example workloads (``clinical``, ``support``, ``backoffice``)."""
    return sorted(p.stem for p in examples_dir().glob("*.yaml"))


def example(name: str) -> Workload:
    """A shipped example workload by name (``clinical``, ``support``, ``backoffice``)."""
    path = examples_dir() / f"{name}.yaml"
    if not path.is_file():
        raise WorkloadError(f"no example workload {name!r} (known: {', '.join(example_names())})")
    return load_workload(path)
