"""Every manifest and compose file we ship is well-formed and consistent, and the Envoy and
kv-extproc configs inside them load (Envoy's own ``--mode validate``, our config loader)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from extproc import config as config_mod

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = sorted((REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml"))
COMPOSE_DIR = REPO_ROOT / "deploy" / "compose"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
API = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "Service": "v1", "ConfigMap": "v1",
       "PersistentVolumeClaim": "v1", "ServiceAccount": "v1", "Role": "rbac.authorization.k8s.io/v1",
       "RoleBinding": "rbac.authorization.k8s.io/v1", "InferencePool": "inference.networking.k8s.io/v1"}
CRD = REPO_ROOT / "deploy" / "kubernetes" / "crds" / "inferencepools.inference.networking.k8s.io.yaml"
KUBERNETES_VERSION = "1.33.0"
"""The Kubernetes API version whose schemas (kubernetes-validate, offline) the manifests must satisfy."""


def k8s_docs() -> list[dict]:
    return [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]


def envoy_validates(text: str, tmp_path: Path) -> None:
    path = tmp_path / f"envoy-{abs(hash(text))}.yaml"
    path.write_text(text)
    result = subprocess.run(["envoy", "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]


def test_every_manifest_is_a_known_kind_with_a_valid_name():
    docs = k8s_docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "Service", "ConfigMap"}
    for doc in docs:
        assert doc["apiVersion"] == API[doc["kind"]], doc["kind"]
        assert DNS1123.match(doc["metadata"]["name"]), doc["metadata"]["name"]


def test_workloads_select_their_own_pods_and_name_their_images_and_ports():
    for doc in (d for d in k8s_docs() if d["kind"] in WORKLOADS):
        spec = doc["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), doc["metadata"]["name"]
        for container in spec["template"]["spec"]["containers"]:
            assert container["image"] and DNS1123.match(container["name"])
            for port in container.get("ports", []):
                assert isinstance(port["containerPort"], int) and 0 < port["containerPort"] < 65536


def test_services_select_pods_that_expose_their_target_ports():
    docs = k8s_docs()
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        chosen = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert chosen, f"service {service['metadata']['name']} selects nothing"
        ports = {p["containerPort"] for w in chosen for c in w["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)


def test_volumes_refer_to_config_maps_and_claims_that_exist():
    docs = k8s_docs()
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names


def test_kv_extproc_runs_two_replicas_non_root_with_grpc_readiness_and_a_valid_config():
    docs = k8s_docs()
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kv-extproc")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["readinessProbe"]["grpc"] == {"port": 9002, "service": "readiness"}
    assert pod["containers"][0]["livenessProbe"]["grpc"] == {"port": 9002, "service": "liveness"}
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kv-extproc-config")
    conf = config_mod.from_dict(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert conf.index.backend == "redis" and conf.discovery.type == "kubernetes"
    from extproc.sim.launcher import paired_fallback_endpoints

    assert conf.endpoint_picker.fallback_endpoints == paired_fallback_endpoints("envoy.yaml"), "paired with envoy.yaml"


def test_the_example_vllm_engines_publish_kv_events_with_a_stable_identity():
    vllm = next(d for d in k8s_docs() if d["kind"] == "StatefulSet")
    args = " ".join(vllm["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--kv-events-config" in args and '"endpoint": "tcp://*:5557"' in args and "--enable-prefix-caching" in args
    assert vllm["spec"]["serviceName"] == "vllm"


def test_the_envoy_config_map_validates(tmp_path):
    config_map = next(d for d in k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "envoy-config")
    envoy_validates(config_map["data"]["envoy.yaml"], tmp_path)


def test_the_compose_file_is_consistent_and_its_configs_load(tmp_path):
    compose = yaml.safe_load((COMPOSE_DIR / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert services["envoy"]["image"].startswith("envoyproxy/envoy:")
    assert {"redis", "kv-extproc", "pod-a", "pod-b", "pod-c"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            assert (COMPOSE_DIR / host).exists(), (name, host)
        if "build" in service:
            assert (COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]).exists()
    from extproc.sim.launcher import paired_fallback_endpoints

    assert config_mod.load(COMPOSE_DIR / "kv-extproc.yaml").endpoint_picker.fallback_endpoints == \
        paired_fallback_endpoints("envoy.yaml")
    envoy_validates((COMPOSE_DIR / "envoy.yaml").read_text(), tmp_path)


def test_docker_compose_itself_accepts_the_compose_file():
    """Debian's docker-compose parses and validates the file without a Docker engine."""
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE_DIR / "docker-compose.yaml"), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_DIR / "docker-compose.yaml"), "config"],
        capture_output=True, text=True, timeout=60, check=True).stdout)["services"]
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert built and all(b["target"] == "demo" for b in built.values()), "the demo needs the bundled tokenizer"


def test_the_redis_cluster_compose_variant_is_accepted_and_its_config_names_the_cluster():
    files = ["-f", str(COMPOSE_DIR / "docker-compose.yaml"), "-f", str(COMPOSE_DIR / "docker-compose.redis-cluster.yaml")]
    merged = yaml.safe_load(subprocess.run(["docker-compose", *files, "config"], capture_output=True, text=True,
                                           timeout=60, check=True).stdout)["services"]
    nodes = {f"{s['networks']['fleet']['ipv4_address']}:6379" for name, s in merged.items()
             if name.startswith("redis-") and name != "redis-cluster-init"}
    assert len(nodes) == 6 and all("--cluster-enabled" in merged[f"redis-{i}"]["command"] for i in range(1, 7))
    init = " ".join(merged["redis-cluster-init"]["command"])
    assert all(node in init for node in nodes) and "--cluster-replicas 1" in init
    extproc = merged["kv-extproc"]
    assert extproc["depends_on"]["redis-cluster-init"] == {"condition": "service_completed_successfully"}
    [mount] = [v for v in extproc["volumes"] if v.endswith(":/etc/kv-extproc/config.yaml:ro")]
    assert mount.startswith(str(COMPOSE_DIR / "kv-extproc-cluster.yaml"))
    conf = config_mod.load(COMPOSE_DIR / "kv-extproc-cluster.yaml")
    assert conf.index.mode == "cluster" and set(conf.index.nodes) <= nodes
    base = config_mod.load(COMPOSE_DIR / "kv-extproc.yaml")
    assert conf.pods == base.pods and conf.models == base.models, "the same demo, another index"


def test_the_kubernetes_config_documents_cluster_and_sentinel_index_settings_that_load():
    config_map = next(d for d in k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kv-extproc-config")
    text = config_map["data"]["config.yaml"]
    for mode in ("cluster", "sentinel"):
        lines = [line.strip().removeprefix("#").strip() for line in text.splitlines()]
        start = next(i for i, line in enumerate(lines) if line.startswith("index:") and f"mode: {mode}" in line)
        snippet = lines[start]
        while snippet.count("{") != snippet.count("}"):
            start += 1
            snippet += " " + lines[start]
        conf = config_mod.from_dict(yaml.safe_load(snippet))
        assert conf.index.mode == mode


def test_the_image_is_slim_and_runs_as_non_root():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")


def test_the_deployed_envoy_configs_are_the_shipped_one_with_their_addresses():
    """compose and Kubernetes carry envoy/envoy.yaml re-rendered: they must not drift from it."""
    from extproc.sim.launcher import render_envoy

    compose = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    assert compose == render_envoy("envoy.yaml", listen="0.0.0.0:8080", admin="0.0.0.0:9901",
                                   extproc=["kv-extproc:9002"],
                                   pods=["172.28.0.11:8000", "172.28.0.12:8000", "172.28.0.13:8000"])
    config_map = next(d for d in k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "envoy-config")
    assert yaml.safe_load(config_map["data"]["envoy.yaml"]) == render_envoy(
        "envoy.yaml", listen="0.0.0.0:8080", admin="127.0.0.1:9901", extproc=["kv-extproc:9002"], pods=["vllm:8000"])


@pytest.mark.parametrize("path", K8S, ids=[p.name for p in K8S])
def test_every_built_in_manifest_validates_against_the_kubernetes_schemas(path):
    """kubernetes-validate: the API's own OpenAPI schemas, offline, strict (no unknown fields)."""
    import kubernetes_validate

    for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
        if doc["kind"] == "InferencePool":
            continue  # a custom resource: checked against its CRD below
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_broken_manifest_is_caught_by_the_schema_check():
    import kubernetes_validate

    broken = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountToken": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def crd_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["group"] == "inference.networking.k8s.io" and crd["spec"]["names"]["kind"] == "InferencePool"
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def test_the_inference_pool_example_validates_against_the_vendored_crd_schema():
    import jsonschema

    [pool] = [d for d in k8s_docs() if d["kind"] == "InferencePool"]
    jsonschema.validate(pool, crd_schema())
    wrong = {**pool, "spec": {**pool["spec"], "targetPorts": [{"number": 70000}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, crd_schema())
    missing = {**pool, "spec": {k: v for k, v in pool["spec"].items() if k != "endpointPickerRef"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(missing, crd_schema())


def test_discovery_rbac_and_the_pool_fit_together():
    docs = k8s_docs()
    conf = config_mod.from_dict(yaml.safe_load(next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kv-extproc-config")["data"]["config.yaml"]))
    [pool] = [d for d in docs if d["kind"] == "InferencePool"]
    assert conf.discovery.kubernetes.inference_pool == pool["metadata"]["name"]
    vllm = next(d for d in docs if d["kind"] == "StatefulSet")
    labels = vllm["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the pool selects the engines"
    ports = {p["containerPort"] for p in vllm["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= ports
    assert {conf.discovery.kubernetes.kv_events_port, conf.discovery.kubernetes.kv_replay_port} <= ports
    [role] = [d for d in docs if d["kind"] == "Role"]
    grants = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"list", "watch"} <= grants[("", "pods")]
    assert {"get", "watch"} <= grants[("inference.networking.k8s.io", "inferencepools")]
    assert all(not ({"create", "update", "patch", "delete"} & verbs) for verbs in grants.values()), "read only"
    [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
    [account] = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"]} in binding["subjects"]
    for name in ("kv-extproc", "kv-extproc-ingest"):
        deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
