"""Prometheus scrapes before and after a run, and what moved in between.

A snapshot keeps every cumulative sample of an endpoint (counters, histogram and summary
``_sum``/``_count``; gauges and buckets are left out) keyed ``name{label="value",...}`` with the
labels sorted and every counter named with its ``_total`` suffix, whether the exposition wrote
it or not (Triton and Envoy do not: ``nv_inference_count`` is ``nv_inference_count_total`` here), so a delta is a plain dict subtraction and a JSON file can hold it. Three
endpoints are read: the gateway's parent ``/metrics`` (``extproc_*``), Triton's ``/metrics``
(``nv_inference_*`` per model, and the CPU reference tiers' ``reference_llm_*``), and Envoy's
``/stats/prometheus`` (its health-check generations, which Triton counts as inferences too).
"""

from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

_KEEP_TYPES = {"counter", "histogram", "summary", "unknown", "untyped"}
_KEY = re.compile(r'^([^{]+)(?:\{(.*)\})?$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def sample_key(name: str, labels: dict[str, str]) -> str:
    """``name{a="x",b="y"}`` (labels sorted; no braces without labels)."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    """The inverse of :func:`sample_key`."""
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"not a sample key: {key!r}")
    return m.group(1), dict(_LABEL.findall(m.group(2) or ""))


def cumulative_samples(text: str) -> dict[str, float]:
    """Every cumulative sample of a Prometheus text exposition (see the module docstring)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type not in _KEEP_TYPES:
            continue
        for sample in family.samples:
            name = sample.name
            if name.endswith(("_bucket", "_created", "_gcount", "_gsum")):
                continue
            if family.type == "counter" and name == family.name:  # an exposition without the suffix
                name += "_total"
            key = sample_key(name, sample.labels)
            out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before`` per sample; a sample that went backwards (a restart) counts from zero."""
    out = {}
    for key, value in after.items():
        old = before.get(key, 0.0)
        moved = value - old if value >= old else value
        if moved:
            out[key] = moved
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    out = 0.0
    for key, value in samples.items():
        if not key.startswith(name):
            continue
        sname, slabels = parse_key(key)
        if sname == name and all(slabels.get(k) == v for k, v in labels.items()):
            out += value
    return out


def by_label(samples: dict[str, float], name: str, label: str, **labels: str) -> dict[str, float]:
    """``name``'s samples summed per value of ``label`` (those whose labels include ``labels``)."""
    out: dict[str, float] = {}
    for key, value in samples.items():
        if not key.startswith(name):
            continue
        sname, slabels = parse_key(key)
        if sname == name and all(slabels.get(k) == v for k, v in labels.items()):
            group = slabels.get(label, "none")
            out[group] = out.get(group, 0.0) + value
    return out


async def snapshot(client: httpx.AsyncClient, url: str | None, timeout: float = 5.0) -> tuple[dict[str, float] | None, str | None]:
    """``(samples, None)``, or ``(None, why)`` when the endpoint cannot be read (or ``url`` is None)."""
    if not url:
        return None, "not configured"
    try:
        reply = await client.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return None, f"{url}: {type(exc).__name__}: {exc}"
    if reply.status_code != 200:
        return None, f"{url}: HTTP {reply.status_code}"
    try:
        return cumulative_samples(reply.text), None
    except ValueError as exc:
        return None, f"{url}: malformed metrics: {exc}"
