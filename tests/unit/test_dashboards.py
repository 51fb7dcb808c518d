"""The Grafana dashboard queries only metrics the gateway really exports, and compose wires it up.

Every PromQL expression of ``observability/grafana/dashboards/*.json`` is reduced to the metric
names it selects (strings, label matchers, ranges, ``by (...)`` clauses, functions and keywords
removed); each must be a sample name :func:`extproc.observability.metrics.metric_names` lists, which is built from
the very metric objects the workers record into and from the Triton collector's families.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from extproc.observability.metrics import GatewayMetrics, metric_names

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "observability"
DASHBOARDS = sorted((OBS / "grafana" / "dashboards").glob("*.json"))

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
             "unless", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                             # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                            # ranges, $__rate_interval
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", expr):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_exprs(path: Path) -> list[str]:
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    dash = json.loads(path.read_text())
    return [t["expr"] for p in walk(dash["panels"]) for t in p.get("targets", []) if t.get("expr")]


def test_the_parser_finds_metric_names_and_nothing_else():
    expr = ('1000 * sum by (tier) (rate(extproc_cost_usd_total{kind=~"a|b"}[$__rate_interval])) / '
            'histogram_quantile(0.95, sum by (le, tier) (rate(x_seconds_bucket[5m]))) + on(tier) group_left y')
    assert promql_metric_names(expr) == {"extproc_cost_usd_total", "x_seconds_bucket", "y"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_query_names_an_exported_metric(path):
    exported = metric_names()
    exprs = dashboard_exprs(path)
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr!r} queries {sorted(names - exported)}, which the gateway does not export"
        used |= names
    # The dashboard shows what the issue asks for: tokens, cost, cache hits, queue depth, GPU memory.
    for needed in ("extproc_tokens_total", "extproc_cost_usd_total", "extproc_cache_requests_total",
                   "extproc_triton_queue_depth", "extproc_triton_gpu_memory_used_bytes"):
        assert needed in used


def test_metric_names_follow_prometheus_conventions():
    for name in metric_names():
        assert name.startswith("extproc_") and name == name.lower()
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert not base.endswith("_total") or "seconds" not in base or base.endswith("seconds_total")
    m = GatewayMetrics()
    for metric in vars(m).values():
        if hasattr(metric, "_type") and metric._type == "histogram":
            assert metric._name.endswith("_seconds"), metric._name  # every histogram is a duration
        elif hasattr(metric, "_type") and metric._type == "counter":
            assert metric._name + "_total" in metric_names()


def test_prometheus_scrapes_the_gateway_metrics_port():
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["extproc"] == ["extproc:9464"]
    assert targets["triton"] == ["triton:8002"]


def test_compose_runs_prometheus_and_grafana_provisioned():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    command = services["extproc"]["command"]
    assert command[command.index("--metrics-port") + 1] == "9464"
    assert "9464" in services["extproc"]["expose"]
    assert any("observability/prometheus.yml:/etc/prometheus/prometheus.yml" in v
               for v in services["prometheus"]["volumes"])
    grafana_volumes = services["grafana"]["volumes"]
    assert any(v.startswith("./observability/grafana/provisioning:") for v in grafana_volumes)
    assert any(v.startswith("./observability/grafana/dashboards:/var/lib/grafana/dashboards") for v in grafana_volumes)
    provider = yaml.safe_load((OBS / "grafana/provisioning/dashboards/dashboards.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((OBS / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    for path in DASHBOARDS:  # the panels' data source is the provisioned one
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == source["datasources"][0]["uid"]
