"""The Kubernetes manifests (deploy/kubernetes/): rendered, validated, scanned, and held to the
values the rest of the repository has.

* every overlay renders with the real kustomize (``kubectl kustomize``);
* every object validates against the real schemas: the kubernetes-models packages (Kubernetes'
  OpenAPI, the KEDA and prometheus-operator CRDs; ``deploy/kubernetes/validate/``) and, for the
  built-in kinds, ``kubernetes-validate``'s strict schemas, which reject unknown fields; a
  deliberately wrong field fails;
* checkov's Kubernetes policies pass, each skip carrying its reason;
* the Envoy YAML inside the ConfigMaps passes the real ``envoy --mode validate``, and the gateway
  YAML the service's own loader;
* the autoscaling rule is the growth lab simulator's (``extproc/lab/simulate/examples/day.yaml``);
* drain budgets, security contexts, native sidecars, Redis AOF, NetworkPolicies.

The tools (the kubernetes-models packages, checkov, and kubectl when the machine has none with
kustomize v5) are installed by ``scripts/ensure-k8s-validators.sh`` into ``.run/k8s-validate/``
(once; cached); node and npm must be on the machine. A missing tool skips locally and FAILS under
CI=true.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.commands import envoy_config as ec
from extproc.framework.config import load_config as load_gateway_config
from extproc.lab.simulate.config import load_config as load_sim_config
from extproc.lab.simulate.service_curves import load_profiles

from ..conftest import require

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
ENSURE = ROOT / "scripts" / "ensure-k8s-validators.sh"
SIM_EXAMPLE = ROOT / "extproc" / "lab" / "simulate" / "examples" / "day.yaml"
#: Kubernetes versions the built-in kinds are checked against: native sidecars are on by default
#: from 1.29 (beta) and GA in 1.33.
K8S_VERSIONS = ("1.29.0", "1.33.0")
#: checkov checks skipped in the manifests (annotation checkov.io/skipN: ID=reason), and why.
ALLOWED_SKIPS = {
    "CKV_K8S_43": "image digests: the images are placeholders that users set with kustomize images:",
}
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


def _kustomize(kubectl: str, path: Path) -> list[dict]:
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    """Paths of kubectl, validate.mjs and checkov, installed by the project's script (cached in .run/)."""
    require(shutil.which("node") is not None and shutil.which("npm") is not None,
            "node and npm are not installed")
    proc = subprocess.run(["bash", str(ENSURE), "--print-paths"], capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    require(proc.returncode == 0, f"scripts/ensure-k8s-validators.sh failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-3000:]}")
    paths = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert all(Path(paths[k]).is_file() for k in ("kubectl", "validate_mjs", "checkov")), paths
    return paths


@pytest.fixture(scope="module")
def rendered(tools) -> dict[str, list[dict]]:
    return {name: _kustomize(tools["kubectl"], K8S / "overlays" / name) for name in OVERLAYS}


def _objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_specs(docs: list[dict]):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d, d["spec"]["template"]["spec"]


def _models_validate(tools: dict[str, str], objects: list[dict]) -> dict:
    proc = subprocess.run(["node", tools["validate_mjs"]], input=json.dumps(objects), capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip(), f"validate.mjs printed nothing (exit {proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _strict_errors(objects: list[dict]) -> list[str]:
    try:
        import kubernetes_validate as kv
    except ImportError:
        require(False, "kubernetes-validate is not installed (pip install -e '.[test]')")

    errors = []
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs: kubernetes-models (above) has their schemas
        for version in K8S_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as err:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {err}")
            except kv.SchemaNotFoundError as err:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: no schema in k8s {version}: {err}")
    return errors


# ---- generated copies ------------------------------------------------------------------------

def test_generated_files_are_up_to_date():
    import importlib.util

    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for path, text in gen.outputs().items():
        assert path.is_file() and path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is out of date: run .venv/bin/python deploy/kubernetes/generate.py")


# ---- render and schemas ----------------------------------------------------------------------

def test_every_overlay_renders(rendered):
    assert set(OVERLAYS) >= {"cpu-reference", "gpu-tensorrt-llm", "gpu-tensorrt-llm-hpa", "sidecar-example"}
    for name in ("cpu-reference", "gpu-tensorrt-llm", "gpu-tensorrt-llm-hpa"):
        kinds = {d["kind"] for d in rendered[name]}
        assert kinds >= {"Namespace", "Deployment", "Service", "StatefulSet", "ConfigMap", "Secret",
                         "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "PodMonitor",
                         "ServiceMonitor", "PersistentVolumeClaim"}, (name, kinds)
        for d in rendered[name]:
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == "llm-extproc", (name, d["kind"], d["metadata"]["name"])
    assert _objects(rendered["cpu-reference"], "ScaledObject")
    assert _objects(rendered["gpu-tensorrt-llm"], "ScaledObject")
    assert not _objects(rendered["gpu-tensorrt-llm-hpa"], "ScaledObject")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_kubernetes_keda_and_prometheus_operator_schemas(rendered, tools, overlay):
    result = _models_validate(tools, rendered[overlay])
    assert result["checked"] == len(rendered[overlay])
    assert result["errors"] == [], json.dumps(result["errors"], indent=1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_against_strict_kubernetes_schemas(rendered, overlay):
    assert _strict_errors(rendered[overlay]) == []


def test_a_wrong_field_fails_validation(rendered, tools, tmp_path):
    """A typo'd key in a Deployment spec, through the whole path: kustomize, then the schemas."""
    neg = ROOT / ".run" / "k8s-validate" / "negative"
    neg.mkdir(parents=True, exist_ok=True)
    (neg / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../../../deploy/kubernetes/overlays/cpu-reference"],
        "patches": [{"target": {"kind": "Deployment", "name": "llm-extproc-gateway"}, "patch": yaml.safe_dump([
            {"op": "add", "path": "/spec/replcias", "value": 3},   # typo of replicas
        ])}]}))
    docs = _kustomize(tools["kubectl"], neg)
    errors = _strict_errors(docs)
    assert any("replcias" in e for e in errors), errors
    # A wrong type in a custom resource: the CRD's schema (kubernetes-models) rejects it.
    bad = json.loads(json.dumps(_objects(rendered["gpu-tensorrt-llm"], "ScaledObject")[0]))
    bad["spec"]["minReplicaCount"] = "one"
    bad_deploy = json.loads(json.dumps(_one(rendered["cpu-reference"], "Deployment", "triton")))
    bad_deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    result = _models_validate(tools, [bad, bad_deploy])
    assert [e["kind"] for e in result["errors"]] == ["ScaledObject", "Deployment"], result


# ---- policy scan -----------------------------------------------------------------------------

def test_checkov_finds_nothing_unexplained(rendered, tools, tmp_path):
    for name, docs in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    proc = subprocess.run([tools["checkov"], "-d", str(tmp_path), "--framework", "kubernetes", "-o", "json",
                           "--quiet", "--compact", "--skip-download"], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.stdout.strip(), f"checkov printed nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    summary = reports[0]["summary"]
    assert summary["resource_count"] >= sum(len(d) for d in rendered.values()) - 10, summary
    assert summary["parsing_errors"] == 0, summary
    failed = [f"{f['check_id']} {f['check_name']}: {f['resource']}"
              for r in reports for f in r["results"]["failed_checks"]]
    assert failed == [], "\n".join(failed)
    assert summary["passed"] > 500, summary
    # Every skip is one of the allowed ones, with its reason written next to it.
    for docs in rendered.values():
        for d in docs:
            for key, value in (d["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = value.partition("=")
                    assert check in ALLOWED_SKIPS and len(reason.strip()) > 10, (d["kind"], key, value)


# ---- the configuration inside the ConfigMaps ------------------------------------------------

def _configmaps(docs: list[dict], prefix: str) -> list[dict]:
    return [d for d in _objects(docs, "ConfigMap") if d["metadata"]["name"].startswith(prefix)]


def test_envoy_yaml_in_the_configmaps_passes_envoy_validate(rendered, tmp_path):
    """Each Envoy container's configuration, from the ConfigMap it mounts, with its own flags."""
    try:
        binary = ec.envoy_binary()
    except ec.EnvoyConfigError as err:
        require(False, str(err))
    checked = set()
    for overlay, docs in rendered.items():
        configmaps = {cm["metadata"]["name"]: cm for cm in _configmaps(docs, "llm-extproc-envoy")}
        for d, spec in _pod_specs(docs):
            for c in spec.get("initContainers", []) + spec["containers"]:
                if c["name"] != "envoy":
                    continue
                mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/envoy/envoy.yaml")
                volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
                text = configmaps[volume["configMap"]["name"]]["data"][mount["subPath"]]
                path = tmp_path / f"{overlay}-{d['metadata']['name']}.yaml"
                path.write_text(text)
                args = list(c["args"])
                args[args.index("-c") + 1] = str(path)
                proc = subprocess.run([binary, "--mode", "validate", *args, "--use-dynamic-base-id"],
                                      capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
                assert proc.returncode == 0 and " OK" in proc.stdout + proc.stderr, (
                    f"{overlay} {d['metadata']['name']}: envoy rejected its configuration:\n"
                    f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                checked.add(mount["subPath"])
    assert checked == {"envoy-gateway.yaml", "envoy-sidecar.yaml"}, checked


def test_gateway_yaml_in_the_configmaps_loads(rendered, tmp_path):
    for name, docs in rendered.items():
        for cm in _configmaps(docs, "llm-extproc-gateway-config"):
            path = tmp_path / f"{name}-gateway.yaml"
            path.write_text(cm["data"]["gateway.yaml"])
            config = load_gateway_config(path)
            assert config.server.host == "0.0.0.0" and config.server.workers >= 1


def test_dashboard_configmap_is_the_repository_dashboard(rendered):
    repo = json.loads((ROOT / "observability" / "grafana" / "dashboards" / "llm-extproc.json").read_text())
    cm = _configmaps(rendered["cpu-reference"], "llm-extproc-grafana-dashboard")[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["llm-extproc.json"]) == repo


# ---- the autoscaling rule is the simulator's --------------------------------------------------

def _behavior_from_sim(hpa) -> dict:
    def rules(policies, select, window):
        return {"stabilizationWindowSeconds": int(window), "selectPolicy": select,
                "policies": [{"type": p.type, "value": int(p.value), "periodSeconds": int(p.period_s)}
                             for p in policies]}
    return {"scaleUp": rules(hpa.scale_up_policies, hpa.scale_up_select, hpa.scale_up_stabilization_s),
            "scaleDown": rules(hpa.scale_down_policies, hpa.scale_down_select, hpa.scale_down_stabilization_s)}


def test_keda_and_hpa_rules_are_the_simulators(rendered):
    sim = load_sim_config(SIM_EXAMPLE)
    # The manifests leave these to the HPA controller's defaults; the simulator must use them.
    assert sim.hpa.sync_period_s == 15 and sim.hpa.tolerance == 0.1
    want_behavior = _behavior_from_sim(sim.hpa)
    # Requests in flight (waiting plus being served) per pod, as the simulator's `inflight` policy
    # for its large (70B) tier: that tier's own target when it has one.
    target = sim.inflight.per_tier.get("large", sim.inflight.target)
    for overlay, metrics in (("cpu-reference", ("reference_llm_waiting_requests{", "reference_llm_active_sequences{")),
                             ("gpu-tensorrt-llm", ('nv_trt_llm_request_metrics{request_type="waiting"',
                                                   'nv_trt_llm_request_metrics{request_type="scheduled"'))):
        so = _one(rendered[overlay], "ScaledObject", "triton")["spec"]
        assert so["scaleTargetRef"]["name"] == "triton"
        assert so["minReplicaCount"] == sim.hpa.min_replicas
        assert so["maxReplicaCount"] == sim.hpa.max_replicas
        assert so["pollingInterval"] == sim.hpa.sync_period_s
        assert so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == want_behavior
        queue = so["triggers"][0]
        assert queue["type"] == "prometheus" and queue["metricType"] == "AverageValue"  # per pod
        assert float(queue["metadata"]["threshold"]) == target
        assert all(m in queue["metadata"]["query"] for m in metrics), queue
    hpa = _one(rendered["gpu-tensorrt-llm-hpa"], "HorizontalPodAutoscaler", "triton")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (sim.hpa.min_replicas, sim.hpa.max_replicas)
    assert hpa["behavior"] == want_behavior
    queue = hpa["metrics"][0]["external"]["target"]
    assert queue["type"] == "AverageValue" and float(queue["averageValue"]) == target
    # The CPU signal is the reference tiers' own gauge, by the name their Triton adapter exports.
    backend = (ROOT / "triton_models" / "reference_llm" / "triton_backend.py").read_text()
    assert '"reference_llm_waiting_requests"' in backend and '"reference_llm_active_sequences"' in backend


def test_gpu_memory_guard(rendered):
    so = _one(rendered["gpu-tensorrt-llm"], "ScaledObject", "triton")["spec"]
    guard = [t for t in so["triggers"] if "DCGM_FI_DEV_FB_USED" in t["metadata"]["query"]]
    assert len(guard) == 1 and guard[0]["metricType"] == "Value"
    assert 0.9 < float(guard[0]["metadata"]["threshold"]) < 1.0
    rule = _one(rendered["gpu-tensorrt-llm"], "PrometheusRule", "triton-gpu-memory")
    assert "DCGM_FI_DEV_FB_USED" in rule["spec"]["groups"][0]["rules"][0]["expr"]
    hpa = _one(rendered["gpu-tensorrt-llm-hpa"], "HorizontalPodAutoscaler", "triton")["spec"]
    assert len(hpa["metrics"]) == 2


def _startup_budget_s(container: dict) -> float:
    probe = container["startupProbe"]
    return probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]


def test_triton_startup_probe_allows_the_simulators_startup_delay(rendered):
    sim = load_sim_config(SIM_EXAMPLE)
    profiles = load_profiles()
    slowest = max(profiles[t.profile].startup_s for t in sim.tiers.values() if t.profile)
    gpu = _one(rendered["gpu-tensorrt-llm"], "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert _startup_budget_s(gpu) >= slowest
    cpu = _one(rendered["cpu-reference"], "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert _startup_budget_s(cpu) >= sim.measured.startup_s


# ---- drain, sidecars, security, state, network ----------------------------------------------

def _prestop_sleep_s(container: dict) -> int:
    cmd = " ".join(container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []))
    m = re.findall(r"sleep\s+(\d+)", cmd)
    return int(m[-1]) if m else 0


def test_termination_grace_is_above_the_drain(rendered):
    sidecar_bound = rendered["cpu-reference"]  # same values in every overlay
    gw_config = load_gateway_config(K8S / "base" / "config" / "gateway.yaml")
    service_drain = gw_config.server.grace_seconds + 5  # the parent waits grace + 5 s for its workers
    for docs in (sidecar_bound, rendered["sidecar-example"]):
        for d, spec in _pod_specs(docs):
            names = [c["name"] for c in spec.get("initContainers", [])]
            if "extproc" not in names:
                continue
            envoy = next(c for c in spec["initContainers"] + spec["containers"] if c["name"] == "envoy")
            assert spec["terminationGracePeriodSeconds"] > _prestop_sleep_s(envoy) + service_drain, d["metadata"]["name"]
            assert "drain_listeners?graceful" in " ".join(envoy["lifecycle"]["preStop"]["exec"]["command"])
    for overlay in ("cpu-reference", "gpu-tensorrt-llm"):
        spec = _one(rendered[overlay], "Deployment", "triton")["spec"]["template"]["spec"]
        triton = spec["containers"][0]
        exit_timeout = int(next(a.split("=")[1] for a in triton["args"] if a.startswith("--exit-timeout-secs=")))
        assert spec["terminationGracePeriodSeconds"] > _prestop_sleep_s(triton) + exit_timeout


def test_extproc_and_envoy_are_native_sidecars(rendered):
    gw = _one(rendered["cpu-reference"], "Deployment", "llm-extproc-gateway")["spec"]["template"]["spec"]
    assert [(c["name"], c.get("restartPolicy")) for c in gw["initContainers"]] == [("extproc", "Always")]
    app = _one(rendered["sidecar-example"], "Deployment", "my-app")["spec"]["template"]
    assert [(c["name"], c.get("restartPolicy")) for c in app["spec"]["initContainers"]] == [
        ("extproc", "Always"), ("envoy", "Always")]
    assert app["metadata"]["labels"]["llm-extproc.io/sidecar"] == "true"
    assert [c["name"] for c in app["spec"]["containers"]] == ["app"]


def test_every_container_is_locked_down(rendered):
    for overlay, docs in rendered.items():
        for d, spec in _pod_specs(docs):
            where = f"{overlay} {d['kind']}/{d['metadata']['name']}"
            assert spec.get("automountServiceAccountToken") is False, where
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            for c in spec.get("initContainers", []) + spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
                assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
                assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][kind]), (where, c["name"], kind)
    gpu = _one(rendered["gpu-tensorrt-llm"], "Deployment", "triton")["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert gpu["nodeSelector"] and gpu["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_redis_is_durable_for_budgets(rendered):
    redis = _one(rendered["cpu-reference"], "StatefulSet", "redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--appendonly"] == "yes" and pairs["--appendfsync"] == "always"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert redis["spec"]["volumeClaimTemplates"]


def test_network_policies(rendered):
    docs = rendered["cpu-reference"]
    gateway_labels = {"app.kubernetes.io/name": "llm-extproc", "app.kubernetes.io/component": "gateway"}
    gw = _one(docs, "NetworkPolicy", "llm-extproc-gateway")["spec"]
    ports = {p["port"] for rule in gw["ingress"] for p in rule["ports"]}
    assert 50051 not in ports and 9901 not in ports, ports    # only Envoy, over loopback
    admin = [r for r in gw["ingress"] if any(p["port"] == 50052 for p in r["ports"])]
    assert admin and all(f.get("podSelector", {}).get("matchLabels") == gateway_labels
                         and "namespaceSelector" not in f for r in admin for f in r["from"])
    redis = _one(docs, "NetworkPolicy", "redis")["spec"]
    sources = [f for r in redis["ingress"] for f in r["from"]]
    assert sources and all(f["podSelector"]["matchLabels"] in (gateway_labels, {"llm-extproc.io/sidecar": "true"})
                           for f in sources)
