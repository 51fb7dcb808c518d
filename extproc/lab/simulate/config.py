"""The simulation's configuration (YAML or JSON), validated with errors that name the key.

See ``examples/day.yaml`` (shipped) for every key with its meaning; relative paths are relative to
the configuration file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from extproc.lab.simulate.workload import DEFAULT_HOURLY

POLICIES = ("static", "cpu", "queue", "inflight")


class ConfigError(ValueError):
    """The configuration is not valid (the message names the key)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TierConfig(_Model):
    """One tier: its replica type (a GPU profile or a measured curve) and its part of the mix."""

    profile: str | None = None  #: a profile of gpu_profiles.yaml
    measured: str | None = None  #: a tier of the measured curves file (e.g. llm-large)
    share: float | None = Field(default=None, ge=0)
    prompt_tokens: dict[str, Any] | float | None = None
    completion_tokens: dict[str, Any] | float | None = None
    gpu_hour_usd: float | None = Field(default=None, ge=0)  #: overrides the profile's
    startup_s: float | None = Field(default=None, ge=0)  #: overrides the profile's
    max_seqs: int | None = Field(default=None, ge=1)  #: overrides the profile's

    @model_validator(mode="after")
    def _one_source(self) -> "TierConfig":
        if (self.profile is None) == (self.measured is None):
            raise ValueError("give exactly one of 'profile' and 'measured'")
        return self


class RuleSettings(_Model):
    """One HPA scaling policy (``spec.behavior.scaleUp/scaleDown.policies[]``)."""

    type: Literal["Pods", "Percent"]
    value: float = Field(gt=0)
    period_s: float = Field(gt=0)


class HpaSettings(_Model):
    """The HPA's parameters (Kubernetes defaults)."""

    sync_period_s: float = Field(15.0, gt=0)
    tolerance: float = Field(0.1, ge=0)
    scale_up_stabilization_s: float = Field(0.0, ge=0)
    scale_down_stabilization_s: float = Field(300.0, ge=0)
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(100, ge=1)
    scale_up_policies: list[RuleSettings] = Field(default_factory=lambda: [
        RuleSettings(type="Percent", value=100, period_s=15), RuleSettings(type="Pods", value=4, period_s=15)])
    scale_up_select: Literal["Max", "Min", "Disabled"] = "Max"
    scale_down_policies: list[RuleSettings] = Field(default_factory=lambda: [
        RuleSettings(type="Percent", value=100, period_s=15)])
    scale_down_select: Literal["Max", "Min", "Disabled"] = "Max"


class CpuSettings(_Model):
    """CPU-based autoscaling: the HPA's target utilisation and the pods' CPU model (autoscalers.CpuModel)."""

    target: float = Field(0.70, gt=0)
    per_tier: dict[str, float] = Field(default_factory=dict)  #: a tier's own target (else ``target``)
    idle: float = Field(0.10, ge=0)
    busy: float = Field(0.80, ge=0)
    per_seq_share: float = Field(0.10, ge=0)
    cap: float = Field(1.0, gt=0)


class QueueSettings(_Model):
    """Queue-depth autoscaling: requests waiting per pod (``nv_inference_pending_request_count``-like),
    against ``target`` (``averageValue``)."""

    target: float = Field(4.0, gt=0)
    per_tier: dict[str, float] = Field(default_factory=dict)  #: a tier's own target (else ``target``)


class InflightSettings(_Model):
    """In-flight autoscaling: requests waiting or being served per pod, against ``target``."""

    target: float = Field(32.0, gt=0)
    per_tier: dict[str, float] = Field(default_factory=dict)  #: a tier's own target (else ``target``)


class ScaleToZeroSettings(_Model):
    """KEDA's scale to zero (``minReplicaCount: 0``) for the listed tiers, under every autoscaling
    policy (cpu, queue, inflight) alike: to 0 after ``cooldown_s`` with no activity, back to 1 when
    requests in flight plus arrivals since the last poll exceed ``activation_threshold``."""

    tiers: list[str] = Field(default_factory=list)
    activation_threshold: float = Field(0.0, ge=0)
    cooldown_s: float = Field(300.0, ge=0)


class StaticSettings(_Model):
    """Static provisioning: sized on the busiest window of the day."""

    peak_window_s: float = Field(7200.0, gt=0)


class MeasuredSettings(_Model):
    """How measured curves (benchmarks/bench_triton_tiers.py) become replicas."""

    max_seqs: int = Field(32, ge=1)
    replica_hour_usd: float = Field(0.0, ge=0)
    startup_s: float = Field(30.0, ge=0)
    prefill_tokens_per_s: float | None = Field(None, gt=0)


class SimConfig(_Model):
    """A capacity simulation: a day at each scale, for each policy."""

    seed: int = 1
    day_hours: float = Field(24.0, gt=0)
    scales: list[float] = Field(default_factory=lambda: [1.0, 2.0, 5.0], min_length=1)
    policies: list[Literal["static", "cpu", "queue", "inflight"]] = Field(default_factory=lambda: list(POLICIES), min_length=1)
    base_rate_rps: float = Field(gt=0)  #: mean arrivals per second over the day at scale 1
    diurnal: list[float] = Field(default_factory=lambda: list(DEFAULT_HOURLY), min_length=1)
    slo_ttft_s: float = Field(2.0, gt=0)
    slo_quantile: float = Field(95.0, gt=0, lt=100)
    tiers: dict[str, TierConfig] = Field(min_length=1)
    profiles_file: str | None = None  #: default: the shipped gpu_profiles.yaml
    curves_file: str | None = None  #: measured curves (default: the shipped measured_cpu_reference.json)
    mix_file: str | None = None  #: the load runner's post-policy mix (overrides shares and token distributions)
    measured: MeasuredSettings = Field(default_factory=MeasuredSettings)
    hpa: HpaSettings = Field(default_factory=HpaSettings)
    cpu: CpuSettings = Field(default_factory=CpuSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    inflight: InflightSettings = Field(default_factory=InflightSettings)
    static: StaticSettings = Field(default_factory=StaticSettings)
    scale_to_zero: ScaleToZeroSettings = Field(default_factory=ScaleToZeroSettings)
    max_prefill_tokens: int = Field(8192, ge=1)
    drain_s: float = Field(3600.0, ge=0)
    series_step_s: float = Field(300.0, gt=0)  #: time step of the replica series in the JSON
    workers: int | None = Field(None, ge=1)  #: processes (default: one per core)
    base_dir: str = "."  #: set by load_config: where relative paths start

    @field_validator("scales")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("scales must be > 0")
        return v

    @model_validator(mode="after")
    def _hpa_bounds(self) -> "SimConfig":
        if self.hpa.min_replicas > self.hpa.max_replicas:
            raise ValueError("hpa.min_replicas must be <= hpa.max_replicas")
        for key, names in (("cpu.per_tier", self.cpu.per_tier), ("queue.per_tier", self.queue.per_tier),
                           ("inflight.per_tier", self.inflight.per_tier),
                           ("scale_to_zero.tiers", self.scale_to_zero.tiers)):
            unknown = sorted(set(names) - set(self.tiers))
            if unknown:
                raise ValueError(f"{key}: {', '.join(unknown)} not under tiers")
            if key != "scale_to_zero.tiers" and any(v <= 0 for v in names.values()):
                raise ValueError(f"{key}: targets must be > 0")
        return self

    def path(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else Path(self.base_dir) / q


def _format(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        lines.append(f"{source}: {key}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any], source: str = "config", base_dir: str | Path = ".") -> SimConfig:
    """A :class:`SimConfig` from a mapping; :class:`ConfigError` names the bad key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return SimConfig(**{**data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None


def load_config(path: str | Path) -> SimConfig:
    """Read a YAML (or JSON) configuration file."""
    p = Path(path)
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    return parse_config(data or {}, str(p), p.resolve().parent)
