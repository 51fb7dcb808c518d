"""Generate the files of the Kubernetes manifests that come from elsewhere in the repository.

kustomize only reads files under a kustomization's own folder, so these are copies, kept in sync
here (``--check`` fails when one is out of date; the manifests' test runs it):

* ``base/envoy/envoy-{gateway,sidecar}.yaml`` and ``components/sidecar/envoy-sidecar.yaml``: Envoy's
  YAML, rendered from ``envoy/envoy.yaml`` (below);
* ``components/sidecar/gateway.yaml``: ``base/config/gateway.yaml`` (the component is applied to
  users' own kustomizations, which cannot reach the base's folder);
* ``base/dashboards/llm-extproc.json``: ``observability/grafana/dashboards/llm-extproc.json``.

Envoy's YAML.

The project's own config code (``extproc.commands.envoy_config.render_config_dict``) rewrites the
listener, the admin address and the cluster endpoints by name; this file only says which
addresses a pod has in Kubernetes:

* the ext_proc service runs in the same pod as Envoy (a native sidecar, or the shared gateway's
  sidecar): ``127.0.0.1:50051``, over loopback, so nothing outside the pod ever reaches it;
* Triton is the ``triton`` Service of the ``llm-extproc`` namespace (``triton.llm-extproc.svc``:
  resolvable from any namespace, so a user's own app in another namespace reaches it too);
* tier ``passthrough`` goes to ``openai-upstream.llm-extproc.svc:8100`` (a placeholder: point it at
  your OpenAI-compatible server, or remove the tier);
* the sidecar's listener binds ``127.0.0.1`` (only the app in its pod talks to it); the shared
  gateway's binds ``0.0.0.0`` (a Service in front of it); admin stays on ``127.0.0.1:9901`` in both
  (it can stop Envoy: never exposed).

    .venv/bin/python deploy/kubernetes/generate.py          # rewrite base/envoy/*.yaml
    .venv/bin/python deploy/kubernetes/generate.py --check  # exit 1 when they are out of date

``tests/deploy/test_kubernetes_manifests.py`` fails when the files are out of date, and runs the
rendered ConfigMaps' YAML through ``envoy --mode validate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from extproc.commands.envoy_config import (DEFAULT_ENVOY_YAML, dump_config, load_config,
                                           render_config_dict)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT_DIR = HERE / "base" / "envoy"
SIDECAR_DIR = HERE / "components" / "sidecar"

NAMESPACE = "llm-extproc"
COMMON = {
    "admin_address": "127.0.0.1",
    "extproc_host": "127.0.0.1",
    "extproc_port": 50051,
    "triton_host": f"triton.{NAMESPACE}.svc",
    "triton_port": 8000,
    "passthrough_host": f"openai-upstream.{NAMESPACE}.svc",
    "passthrough_port": 8100,
}
#: file name -> the listener address of that role
ROLES = {
    "envoy-sidecar.yaml": "127.0.0.1",
    "envoy-gateway.yaml": "0.0.0.0",
}

HEADER = (
    "# GENERATED from envoy/envoy.yaml by `python deploy/kubernetes/generate.py` -- do not edit.\n"
    "# Role: {role}. Listener {listen}:10000, admin 127.0.0.1:9901, ext_proc 127.0.0.1:50051 (same pod),\n"
    "# Triton triton.{ns}.svc:8000, passthrough openai-upstream.{ns}.svc:8100 (placeholder).\n"
    "# tests/deploy/test_kubernetes_manifests.py fails when this file is out of date.\n"
)


def render(name: str) -> str:
    listen = ROLES[name]
    config = render_config_dict(load_config(DEFAULT_ENVOY_YAML), listen_address=listen,
                                listen_port=10000, admin_port=9901, **COMMON)
    role = "sidecar (the app in the same pod is the only client)" if "sidecar" in name else \
        "shared gateway (behind the llm-extproc-gateway Service)"
    return HEADER.format(role=role, listen=listen, ns=NAMESPACE) + dump_config(config)


def outputs() -> dict[Path, str]:
    """Every generated file and its text."""
    out = {OUT_DIR / name: render(name) for name in ROLES}
    out[SIDECAR_DIR / "envoy-sidecar.yaml"] = out[OUT_DIR / "envoy-sidecar.yaml"]
    out[SIDECAR_DIR / "gateway.yaml"] = (HERE / "base" / "config" / "gateway.yaml").read_text(encoding="utf-8")
    out[HERE / "base" / "dashboards" / "llm-extproc.json"] = (
        REPO / "observability" / "grafana" / "dashboards" / "llm-extproc.json").read_text(encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = ap.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date (run python deploy/kubernetes/generate.py):\n  " + "\n  ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
