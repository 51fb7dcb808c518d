"""Per-tier service curves: what one replica of a tier can do.

A :class:`ServiceCurve` is, for one replica (one Triton pod with its GPUs):

* ``throughput(b)``: output tokens/s of the whole replica when ``b`` sequences decode at once
  (continuous / in-flight batching), and ``per_seq_rate(b) = throughput(b) / b``, the decode
  speed each of those sequences sees;
* ``prefill_time(n)``: seconds of one prefill pass over ``n`` prompt tokens
  (``prefill_overhead_s + n / prefill_tokens_per_s``);
* ``max_seqs``: concurrent sequences per replica (KV-cache slots);
* ``gpus``, ``gpu_hour_usd`` and ``startup_s`` (pod start-up: image, weights, engine warm-up).

Two sources:

* **GPU profiles** (:func:`load_profiles`): ``gpu_profiles.yaml`` next to this module, published
  TensorRT-LLM / NIM figures with the source of every number (the YAML says which table).
  A profile gives its decode curve as a *step model*: one decode step over ``b`` sequences takes
  ``base_ms + per_seq_ms × b`` (weights read once per step, plus per-sequence KV and compute),
  fitted through two published points: the single-stream inter-token latency (``base_ms``
  ≈ step at b=1) and the maximum-load throughput at ``peak_batch``. The YAML lists how this
  model compares with the intermediate points NVIDIA published (within 5-11 %).
* **Measured here** (:func:`load_bench`, :func:`curves_from_bench`): the cells of
  ``benchmarks/bench_triton_tiers.py`` (tokens/s at 1, 4, 16, 32 concurrent streams with
  in-flight batching on). That script prints a table and writes no JSON; this module reads
  either its printed table (:func:`parse_bench_table`) or a JSON list of its ``Cell`` fields
  (``dataclasses.asdict`` of each cell, or ``tok_s`` directly), see ``measured_cpu_reference.json``.
  Gaps of that source, filled with stated approximations: it does not vary the prompt length
  (prefill rate not measured: taken as the tokens/s at the largest measured batch, a prefill pass
  over n tokens costing about a decode step over n sequences; the overhead is the TTFT p50 at one
  stream), it does not record ``max_active_sequences`` (``--batch-on-size``, default 32: a
  parameter here), and it runs on CPUs (price per replica-hour: a parameter).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

HERE = Path(__file__).resolve().parent
PROFILES_FILE = HERE / "gpu_profiles.yaml"
MEASURED_REFERENCE = HERE / "measured_cpu_reference.json"


@dataclass(frozen=True)
class ServiceCurve:
    """What one replica of a tier can do (see the module docstring).

    ``batch`` and ``tokens_per_s`` are the curve's points (aggregate output tokens/s at that many
    concurrent decoding sequences), interpolated linearly, flat past the last point.
    """

    name: str
    batch: tuple[int, ...]
    tokens_per_s: tuple[float, ...]
    max_seqs: int
    prefill_tokens_per_s: float = math.inf
    prefill_overhead_s: float = 0.0
    gpus: int = 1
    gpu_hour_usd: float = 0.0
    startup_s: float = 0.0
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.batch) != len(self.tokens_per_s) or not self.batch:
            raise ValueError(f"{self.name}: batch and tokens_per_s need the same, non-zero, length")
        if list(self.batch) != sorted(set(self.batch)) or self.batch[0] < 1:
            raise ValueError(f"{self.name}: batch points must be increasing integers >= 1")
        if any(t <= 0 for t in self.tokens_per_s):
            raise ValueError(f"{self.name}: tokens_per_s must be > 0")
        if self.max_seqs < 1:
            raise ValueError(f"{self.name}: max_seqs must be >= 1")
        if self.prefill_tokens_per_s <= 0 or self.prefill_overhead_s < 0:
            raise ValueError(f"{self.name}: prefill_tokens_per_s must be > 0, prefill_overhead_s >= 0")

    def throughput(self, b: float) -> float:
        """Aggregate output tokens/s of the replica with ``b`` sequences decoding."""
        if b <= 0:
            return 0.0
        xs, ys = self.batch, self.tokens_per_s
        if b <= xs[0]:
            return ys[0] * b / xs[0]  # below the first point: per-sequence speed of the first point
        if b >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_left(xs, b)
        if xs[i] == b:
            return ys[i]
        f = (b - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + f * (ys[i] - ys[i - 1])

    def per_seq_rate(self, b: int) -> float:
        """Tokens/s each of ``b`` concurrently decoding sequences gets."""
        return self.throughput(b) / b if b > 0 else 0.0

    def rate_table(self) -> list[float]:
        """``per_seq_rate(b)`` for b = 0 .. max_seqs (index b)."""
        return [self.per_seq_rate(b) for b in range(self.max_seqs + 1)]

    def prefill_time(self, prompt_tokens: float) -> float:
        """Seconds of one prefill pass over ``prompt_tokens`` tokens."""
        if math.isinf(self.prefill_tokens_per_s):
            return self.prefill_overhead_s
        return self.prefill_overhead_s + prompt_tokens / self.prefill_tokens_per_s

    @property
    def peak_tokens_per_s(self) -> float:
        return self.throughput(self.max_seqs)

    def with_overrides(self, **changes: Any) -> "ServiceCurve":
        """A copy with some fields changed (e.g. ``gpu_hour_usd``, ``startup_s``, ``max_seqs``)."""
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data.update({k: v for k, v in changes.items() if v is not None})
        return ServiceCurve(**data)

    @classmethod
    def from_step_model(cls, name: str, *, base_ms: float, per_seq_ms: float, max_seqs: int,
                        points: Sequence[int] | None = None, **kwargs: Any) -> "ServiceCurve":
        """A curve from the decode step model ``step(b) = base_ms + per_seq_ms × b``:
        throughput ``b / step(b)``, sampled at ``points`` (default: every batch size 1..max_seqs)."""
        if base_ms <= 0 or per_seq_ms < 0:
            raise ValueError(f"{name}: base_ms must be > 0 and per_seq_ms >= 0")
        if points is None:
            points = range(1, max_seqs + 1)
        tps = tuple(b / ((base_ms + per_seq_ms * b) / 1000.0) for b in points)
        return cls(name=name, batch=tuple(points), tokens_per_s=tps, max_seqs=max_seqs, **kwargs)

    @classmethod
    def exponential(cls, rate_per_s: float, *, name: str = "mm1") -> "ServiceCurve":
        """One sequence per replica, no prefill: with exponentially distributed completion tokens
        and ``rate_per_s`` tokens/s, service times are exponential with mean ``mean_tokens / rate``
        (the M/M/c check)."""
        return cls(name=name, batch=(1,), tokens_per_s=(rate_per_s,), max_seqs=1)


# --- GPU profiles ---------------------------------------------------------------------------------


def _value(node: Any, where: str) -> float:
    """A number of the profiles YAML: ``{value: x, source: ...}`` (or a bare number)."""
    if isinstance(node, Mapping):
        if "value" not in node:
            raise ValueError(f"{where}: expected {{value: ..., source: ...}}")
        if not node.get("source"):
            raise ValueError(f"{where}: every number needs a source (or 'assumed')")
        return float(node["value"])
    if isinstance(node, (int, float)):
        return float(node)
    raise ValueError(f"{where}: expected a number")


def _source(node: Any) -> str:
    return str(node.get("source", "")) if isinstance(node, Mapping) else ""


def profile_curve(name: str, spec: Mapping[str, Any]) -> ServiceCurve:
    """The :class:`ServiceCurve` of one entry of ``gpu_profiles.yaml``."""
    where = f"profiles.{name}"
    try:
        decode = spec["decode"]
        prefill = spec["prefill"]
    except KeyError as exc:
        raise ValueError(f"{where}: missing key {exc.args[0]!r}") from None
    base_ms = _value(decode["base_ms"], f"{where}.decode.base_ms")
    peak_tps = _value(decode["peak_tokens_per_s"], f"{where}.decode.peak_tokens_per_s")
    peak_batch = int(_value(decode["peak_batch"], f"{where}.decode.peak_batch"))
    step_at_peak_ms = peak_batch / peak_tps * 1000.0
    per_seq_ms = (step_at_peak_ms - base_ms) / peak_batch
    if per_seq_ms < 0:
        raise ValueError(f"{where}: peak throughput implies a step shorter than base_ms")
    max_seqs = int(_value(spec["max_seqs"], f"{where}.max_seqs"))
    rate = _value(prefill["tokens_per_s"], f"{where}.prefill.tokens_per_s")
    overhead_ms = _value(prefill["overhead_ms"], f"{where}.prefill.overhead_ms")
    sources = {
        "decode.base_ms": _source(decode["base_ms"]),
        "decode.peak_tokens_per_s": _source(decode["peak_tokens_per_s"]),
        "decode.peak_batch": _source(decode["peak_batch"]),
        "prefill.tokens_per_s": _source(prefill["tokens_per_s"]),
        "prefill.overhead_ms": _source(prefill["overhead_ms"]),
        "max_seqs": _source(spec["max_seqs"]),
        "gpus": _source(spec.get("gpus")),
        "gpu_hour_usd": _source(spec.get("gpu_hour_usd")),
        "startup_s": _source(spec.get("startup_s")),
    }
    return ServiceCurve.from_step_model(
        name, base_ms=base_ms, per_seq_ms=per_seq_ms, max_seqs=max_seqs,
        prefill_tokens_per_s=rate, prefill_overhead_s=overhead_ms / 1000.0,
        gpus=int(_value(spec.get("gpus", 1), f"{where}.gpus")),
        gpu_hour_usd=_value(spec.get("gpu_hour_usd", 0.0), f"{where}.gpu_hour_usd"),
        startup_s=_value(spec.get("startup_s", 0.0), f"{where}.startup_s"),
        sources={k: v for k, v in sources.items() if v},
    )


def load_profiles(path: str | Path | None = None) -> dict[str, ServiceCurve]:
    """Every profile of ``gpu_profiles.yaml`` (or ``path``), by name."""
    data = yaml.safe_load(Path(path or PROFILES_FILE).read_text())
    profiles = (data or {}).get("profiles")
    if not isinstance(profiles, Mapping) or not profiles:
        raise ValueError(f"{path or PROFILES_FILE}: no 'profiles' mapping")
    return {name: profile_curve(name, spec) for name, spec in profiles.items()}


# --- measured here: benchmarks/bench_triton_tiers.py ----------------------------------------------


@dataclass(frozen=True)
class BenchCell:
    """One cell of ``bench_triton_tiers.py``: a tier, batching on/off, n concurrent streams."""

    tier: str
    batching: str
    streams: int
    tok_s: float
    ttft_p50_ms: float | None = None


def _cell(d: Mapping[str, Any], where: str) -> BenchCell:
    try:
        tier, batching, streams = str(d["tier"]), str(d["batching"]), int(d["streams"])
    except KeyError as exc:
        raise ValueError(f"{where}: missing key {exc.args[0]!r}") from None
    if "tok_s" in d:
        tok_s = float(d["tok_s"])
    elif "tokens" in d and "wall" in d:  # dataclasses.asdict(Cell)
        tok_s = float(d["tokens"]) / float(d["wall"]) if float(d["wall"]) else 0.0
    else:
        raise ValueError(f"{where}: needs 'tok_s' or 'tokens' and 'wall'")
    ttft = d.get("ttft_p50_ms")
    if ttft is None and isinstance(d.get("ttft"), list) and d["ttft"]:
        xs = sorted(float(x) for x in d["ttft"] if x == x)
        ttft = xs[len(xs) // 2] * 1000.0 if xs else None
    return BenchCell(tier, batching, streams, tok_s, None if ttft is None else float(ttft))


def load_bench(path: str | Path) -> list[BenchCell]:
    """Cells from a JSON file (``{"cells": [...]}`` or a list) or the bench's printed table."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return parse_bench_table(text)
    rows = data.get("cells") if isinstance(data, Mapping) else data
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of cells or {{'cells': [...]}}")
    return [_cell(r, f"{path}: cells[{i}]") for i, r in enumerate(rows)]


_ROW = re.compile(r"^(llm-\S+)\s+(on|off)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.naN]+)\s+")


def parse_bench_table(text: str) -> list[BenchCell]:
    """The cells of ``bench_triton_tiers.py``'s printed table (its stdout)."""
    cells = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            tier, mode, streams, _reqs, _tokens, _wall, tok_s, p50 = m.groups()
            cells.append(BenchCell(tier, mode, int(streams), float(tok_s),
                                   None if p50.lower() == "nan" else float(p50)))
    if not cells:
        raise ValueError("no bench_triton_tiers.py table rows found")
    return cells


def curves_from_bench(cells: Iterable[BenchCell], *, max_seqs: int = 32, replica_hour_usd: float = 0.0,
                      startup_s: float = 0.0, prefill_tokens_per_s: float | None = None,
                      batching: str = "on") -> dict[str, ServiceCurve]:
    """One :class:`ServiceCurve` per tier from the measured cells (batching ``on``).

    Prefill (not measured by the bench): ``prefill_tokens_per_s`` if given, else the tokens/s at
    the largest measured batch; overhead: the TTFT p50 at the smallest batch (short prompts).
    ``gpus`` is 1 and ``gpu_hour_usd`` is ``replica_hour_usd`` (a CPU replica's price).
    """
    by_tier: dict[str, list[BenchCell]] = {}
    for c in cells:
        if c.batching == batching:
            by_tier.setdefault(c.tier, []).append(c)
    if not by_tier:
        raise ValueError(f"no cells with batching {batching!r}")
    out = {}
    for tier, cs in by_tier.items():
        cs = sorted(cs, key=lambda c: c.streams)
        rate = prefill_tokens_per_s or cs[-1].tok_s
        overhead = (cs[0].ttft_p50_ms or 0.0) / 1000.0
        out[tier] = ServiceCurve(
            name=f"measured:{tier}", batch=tuple(c.streams for c in cs), tokens_per_s=tuple(c.tok_s for c in cs),
            max_seqs=max_seqs, prefill_tokens_per_s=rate, prefill_overhead_s=overhead, gpus=1,
            gpu_hour_usd=replica_hour_usd, startup_s=startup_s,
            sources={"tokens_per_s": "benchmarks/bench_triton_tiers.py (measured here)",
                     "prefill.tokens_per_s": "approximation: tokens/s at the largest measured batch"
                     if prefill_tokens_per_s is None else "given",
                     "prefill.overhead_ms": "TTFT p50 at the smallest measured batch",
                     "max_seqs": "bench --batch-on-size (not in its output; a parameter)"},
        )
    return out
