"""Generate the files of the Kubernetes manifests that come from elsewhere in the repository.

kustomize only reads files under a kustomization's own folder, so these are copies, kept in sync
here (``--check`` fails when one is out of date; the manifests' test runs it):

* ``base/envoy/envoy-{gateway,sidecar}.yaml`` and ``components/sidecar/envoy-sidecar.yaml``: Envoy's
  YAML, rendered from ``envoy/envoy.yaml`` (below);
* ``components/sidecar/gateway.yaml``: ``base/config/gateway.yaml`` (the component is applied to
  users' own kustomizations, which cannot reach the base's folder);
* ``base/dashboards/llm-extproc.json``: ``observability/grafana/dashboards/llm-extproc.json``;
* the autoscaling rule of Triton, ``overlays/{cpu-reference,gpu-tensorrt-llm}/scaledobject.yaml``
  (KEDA) and ``overlays/gpu-tensorrt-llm-hpa/hpa.yaml`` (HPA v2 on an external metric): its values
  (target queue depth per pod, stabilisation windows, scaling policies, min/max replicas) are read
  from the growth lab simulator's example, ``extproc/lab/simulate/examples/day.yaml``, the one
  source of truth, so that ``extproc simulate`` projects this deployment (below).

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
from typing import Any

import yaml

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


# ---- the autoscaling rule (from the growth lab's simulator) ----------------------------------

SIM_EXAMPLE = REPO / "extproc" / "lab" / "simulate" / "examples" / "day.yaml"
#: The simulator's tier these manifests' Triton pool is (2 GPUs per pod on the GPU overlay: the 70B).
SIM_TIER = "large"
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"   # kube-prometheus-stack's; change to yours
SELECTOR = f'namespace="{NAMESPACE}", service="triton"'
#: Requests in flight in each backend (waiting to be scheduled plus being served), summed over the
#: pool: metricType AverageValue divides by the replica count, i.e. requests in flight per pod
#: against the target, as the simulator's `inflight` policy. Not requests waiting alone (the
#: simulator's `queue` policy): that gauge reads ~0 until the pool saturates; even with its target
#: derived from the service curve (0.3 waiting per pod) the lab measured it at -13 % to +1 % GPU-hours
#: against static provisioning at 5x, still running up to maxReplicas, where in flight is -29 % to
#: -31 % within the SLO (extproc/lab/simulate/README.md).
QUEUE_QUERIES = {
    # The reference tiers' own gauges (triton_models/reference_llm/triton_backend.py): Triton's
    # nv_inference_pending_request_count stays 0 for these decoupled models however loaded they are.
    "cpu-reference": (f"sum(reference_llm_waiting_requests{{{SELECTOR}}})"
                      f" + sum(reference_llm_active_sequences{{{SELECTOR}}})"),
    # TensorRT-LLM's in-flight batcher: its scheduled requests (in the batch now) plus those waiting for one. (Check
    # your version's metrics: where `scheduled` already counts the waiting ones, drop the second term.)
    "gpu-tensorrt-llm": (f'sum(nv_trt_llm_request_metrics{{request_type="scheduled", {SELECTOR}}})'
                         f' + sum(nv_trt_llm_request_metrics{{request_type="waiting", {SELECTOR}}})'),
}
_DCGM = f'{{namespace="{NAMESPACE}", pod=~"triton-.*"}}'
GPU_MEMORY_QUERY = (f"max(DCGM_FI_DEV_FB_USED{_DCGM} / (DCGM_FI_DEV_FB_USED{_DCGM} + DCGM_FI_DEV_FB_FREE{_DCGM}))")
GPU_MEMORY_GUARD = 0.95

RULE_HEADER = """\
# GENERATED by `python deploy/kubernetes/generate.py` -- do not edit: change the growth lab's
# extproc/lab/simulate/examples/day.yaml (hpa:, inflight:) and regenerate, so that `extproc simulate`
# keeps projecting this deployment. tests/deploy/test_kubernetes_manifests.py fails when out of date.
#
# Triton scales on queue depth -- requests in flight (waiting or being served) per pod -- not on
# CPU or GPU utilisation (an inference server's CPU reads "busy" whatever its batch), nor on
# requests waiting alone (~0 until the pool saturates; docs/deploying-on-kubernetes.md).
#   target {target:g} in flight per pod (AverageValue), {min}..{max} replicas (no scale-to-zero: a cold pod
#     takes minutes to load its model);
#   scale-up: stabilisation {up_window:g} s, then {up_policies}; a window above 0 ignores short
#     bursts that would buy a pod arriving after them (a 70B pod takes ~300 s to serve);
#   scale-down: stabilisation {down_window:g} s, then {down_policies}; slow, because a fast scale-down
#     empties the pool after every burst and the next ramp waits minutes for pods (the lab's figures: extproc/lab/simulate/README.md);
#   the HPA controller's own defaults make the rest of the rule: sync period {sync:g} s, tolerance {tol:g}.
"""
GPU_GUARD_NOTE = """\
#
# The second trigger is a GPU-memory guard (DCGM exporter): the fullest GPU's framebuffer share as
# a Value target of {guard:g}. The HPA follows the larger proposal, so above it this one holds the
# pool (no scale-down) and adds a pod; below it the queue rule decides alone. Not a load signal:
# TensorRT-LLM allocates its paged KV cache up front (kv_cache_free_gpu_mem_fraction 0.90 in
# triton_models/trtllm/values.example.yaml), so a healthy pod sits near 0.9 whatever its load;
# above {guard:g} is memory beyond the cache. The alert in gpu-memory-alerts.yaml pages on it.
"""


def _policies(rules) -> list[dict[str, Any]]:
    return [{"type": r.type, "value": int(r.value), "periodSeconds": int(r.period_s)} for r in rules]


def _behavior(hpa) -> dict[str, Any]:
    return {
        "scaleUp": {"stabilizationWindowSeconds": int(hpa.scale_up_stabilization_s),
                    "selectPolicy": hpa.scale_up_select, "policies": _policies(hpa.scale_up_policies)},
        "scaleDown": {"stabilizationWindowSeconds": int(hpa.scale_down_stabilization_s),
                      "selectPolicy": hpa.scale_down_select, "policies": _policies(hpa.scale_down_policies)},
    }


def _describe(rules, select: str) -> str:
    parts = [f"{int(r.value)}{' %' if r.type == 'Percent' else ' pods'} per {int(r.period_s)} s" for r in rules]
    return parts[0] if len(parts) == 1 else f"{select.lower()}({', '.join(parts)})"


def _threshold(value: float) -> str:
    return f"{value:g}"


def _target(sim) -> float:
    """The in-flight target of the simulator's :data:`SIM_TIER` (its ``per_tier`` entry, else the policy's)."""
    return sim.inflight.per_tier.get(SIM_TIER, sim.inflight.target)


def _header(sim, gpu_guard: bool) -> str:
    h = sim.hpa
    text = RULE_HEADER.format(
        target=_target(sim), min=h.min_replicas, max=h.max_replicas, up_window=h.scale_up_stabilization_s,
        up_policies=_describe(h.scale_up_policies, h.scale_up_select), down_window=h.scale_down_stabilization_s,
        down_policies=_describe(h.scale_down_policies, h.scale_down_select), sync=h.sync_period_s, tol=h.tolerance)
    return text + (GPU_GUARD_NOTE.format(guard=GPU_MEMORY_GUARD) if gpu_guard else "")


def _check_controller_defaults(sim) -> None:
    # The HPA's sync period and tolerance are the controller's flags, not fields of an HPA: the
    # manifests can only match a simulator that uses the defaults.
    if sim.hpa.sync_period_s != 15 or sim.hpa.tolerance != 0.1:
        raise SystemExit(f"{SIM_EXAMPLE}: hpa.sync_period_s / tolerance are not the HPA controller's "
                         "defaults (15 s, 0.1); an HPA object cannot set them")


def scaled_object(overlay: str, sim) -> str:
    _check_controller_defaults(sim)
    triggers: list[dict[str, Any]] = [{
        "type": "prometheus", "name": "requests-in-flight", "metricType": "AverageValue",
        "metadata": {"serverAddress": PROMETHEUS, "query": QUEUE_QUERIES[overlay],
                     "threshold": _threshold(_target(sim))}}]
    gpu = overlay.startswith("gpu")
    if gpu:
        triggers.append({"type": "prometheus", "name": "gpu-memory-guard", "metricType": "Value",
                         "metadata": {"serverAddress": PROMETHEUS, "query": GPU_MEMORY_QUERY,
                                      "threshold": _threshold(GPU_MEMORY_GUARD)}})
    obj = {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "triton"},
        "spec": {
            "scaleTargetRef": {"name": "triton"},
            "pollingInterval": int(sim.hpa.sync_period_s),
            "minReplicaCount": sim.hpa.min_replicas,
            "maxReplicaCount": sim.hpa.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(sim.hpa)}},
            "triggers": triggers,
        },
    }
    return _header(sim, gpu) + yaml.safe_dump(obj, sort_keys=False, width=4096)


def external_hpa(sim) -> str:
    """The HPA v2 alternative: the same rule on prometheus-adapter's external metrics
    (overlays/gpu-tensorrt-llm-hpa/prometheus-adapter-rules.yaml)."""
    _check_controller_defaults(sim)
    obj = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "triton"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"},
            "minReplicas": sim.hpa.min_replicas,
            "maxReplicas": sim.hpa.max_replicas,
            "metrics": [
                {"type": "External", "external": {
                    "metric": {"name": "llm_extproc_triton_requests_in_flight",
                               "selector": {"matchLabels": {"namespace": NAMESPACE, "service": "triton"}}},
                    "target": {"type": "AverageValue", "averageValue": _threshold(_target(sim))}}},
                {"type": "External", "external": {
                    "metric": {"name": "llm_extproc_triton_gpu_memory_used_ratio",
                               "selector": {"matchLabels": {"namespace": NAMESPACE}}},
                    "target": {"type": "Value", "value": f"{int(round(GPU_MEMORY_GUARD * 1000))}m"}}},
            ],
            "behavior": _behavior(sim.hpa),
        },
    }
    return _header(sim, True) + yaml.safe_dump(obj, sort_keys=False, width=4096)


def outputs() -> dict[Path, str]:
    """Every generated file and its text."""
    out = {OUT_DIR / name: render(name) for name in ROLES}
    out[SIDECAR_DIR / "envoy-sidecar.yaml"] = out[OUT_DIR / "envoy-sidecar.yaml"]
    out[SIDECAR_DIR / "gateway.yaml"] = (HERE / "base" / "config" / "gateway.yaml").read_text(encoding="utf-8")
    out[HERE / "base" / "dashboards" / "llm-extproc.json"] = (
        REPO / "observability" / "grafana" / "dashboards" / "llm-extproc.json").read_text(encoding="utf-8")
    from extproc.lab.simulate.config import load_config as load_sim_config

    sim = load_sim_config(SIM_EXAMPLE)
    for overlay in QUEUE_QUERIES:
        out[HERE / "overlays" / overlay / "scaledobject.yaml"] = scaled_object(overlay, sim)
    out[HERE / "overlays" / "gpu-tensorrt-llm-hpa" / "hpa.yaml"] = external_hpa(sim)
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
