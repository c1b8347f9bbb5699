"""Every manifest under infra/ is checked without a cluster: YAML parses, apiVersion/kind are
known, required fields are present, every job entrypoint names a module and config that exist
and whose config validates with the manifest's ``--set`` overrides, the Serve configs' import
paths resolve to buildable applications, and no credential is written anywhere.

These are structural checks: nothing here is applied to Kubernetes or AWS.
"""

from __future__ import annotations

import copy
import importlib
import io
import re
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.manifests import (
    INFRA, K8S, REPO, docs_of_kind, entrypoints, k8s_docs, parse_entrypoint, pod_templates, rayjob_specs,
    repo_serve_configs,
)

CLUSTER_LAUNCHER = INFRA / "aws" / "cluster.yaml"
SERVICE_ACCOUNT = "embedforge"

KNOWN_KINDS = {
    ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService"),
    ("ray.io/v1", "RayCronJob"), ("batch/v1", "CronJob"), ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"), ("v1", "Secret"), ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}


# ---------------------------------------------------------------- parse, kinds, basics

def test_every_yaml_under_infra_parses_and_has_a_known_kind():
    paths = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert CLUSTER_LAUNCHER in paths and len(paths) >= 8, paths
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path}: empty"
        if path == CLUSTER_LAUNCHER:
            continue
        for doc in docs:
            key = (doc.get("apiVersion"), doc.get("kind"))
            assert key in KNOWN_KINDS, f"{path}: unknown apiVersion/kind {key}"
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name") or doc["metadata"].get("generateName"), path


def test_kustomization_lists_existing_files_and_no_generate_name_objects():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        path = K8S / res
        assert path.is_file(), f"kustomization resource {res} does not exist"
        for doc in yaml.safe_load_all(path.read_text()):
            assert "name" in doc["metadata"], f"{res}: kustomize needs metadata.name (generateName is for create)"


def test_expected_manifests_exist():
    kinds = {d["kind"] for _, d in k8s_docs()}
    assert {"RayCluster", "RayJob", "RayService", "RayCronJob", "CronJob", "ServiceAccount"} <= kinds
    stages = {d["metadata"]["labels"]["embedforge/stage"] for _, d in docs_of_kind("RayJob")}
    assert {"synthesize", "reward", "train", "evaluate", "debate_eval", "pipeline"} <= stages


# ---------------------------------------------------------------- RayCluster specs

def check_cluster_spec(where: str, spec: dict[str, Any]) -> None:
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: enableInTreeAutoscaling must be true"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"], where
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no workerGroupSpecs"
    gpu_groups = []
    for g in groups:
        for field in ("groupName", "minReplicas", "maxReplicas", "template"):
            assert field in g, f"{where}: worker group missing {field}"
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], (where, g["groupName"])
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(g)
    assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), f"{where}: no autoscaling GPU group"
    for tmpl in pod_templates(spec):
        pod = tmpl["spec"]
        assert pod.get("serviceAccountName") == SERVICE_ACCOUNT, f"{where}: pods must run as {SERVICE_ACCOUNT} (IRSA)"
        for c in pod["containers"]:
            # Relative config paths in entrypoints and Serve args resolve against the repo copy.
            assert c.get("workingDir") == "/home/ray/embedforge", f"{where}: container {c['name']} workingDir"
            assert c.get("image"), where


def test_rayclusters_have_head_and_autoscaling_gpu_workers():
    clusters = docs_of_kind("RayCluster")
    assert clusters
    for where, doc in clusters:
        check_cluster_spec(where, doc["spec"])


def test_service_account_uses_an_iam_role_annotation():
    accounts = {d["metadata"]["name"]: d for _, d in docs_of_kind("ServiceAccount")}
    sa = accounts[SERVICE_ACCOUNT]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


# ---------------------------------------------------------------- RayJobs and schedules

def test_rayjobs_target_a_cluster():
    cluster_names = {d["metadata"]["name"] for _, d in docs_of_kind("RayCluster")}
    specs = rayjob_specs()
    assert len(specs) >= 8
    for where, spec in specs:
        assert spec.get("entrypoint"), f"{where}: entrypoint missing"
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), \
            f"{where}: exactly one of rayClusterSpec / clusterSelector"
        if "clusterSelector" in spec:
            assert spec["clusterSelector"].get("ray.io/cluster") in cluster_names, f"{where}: selects no known cluster"
            assert not spec.get("shutdownAfterJobFinishes"), f"{where}: never shut down the shared cluster"
        else:
            check_cluster_spec(where, spec["rayClusterSpec"])
            assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: own cluster must be shut down"
            assert isinstance(spec.get("ttlSecondsAfterFinished"), int), f"{where}: ttlSecondsAfterFinished"


def test_scheduled_pipeline_runs_are_the_pipeline_rayjob():
    pipeline = [d for _, d in docs_of_kind("RayJob") if d["metadata"]["labels"]["embedforge/stage"] == "pipeline"]
    assert len(pipeline) == 1
    spec = pipeline[0]["spec"]
    cron_jobs = docs_of_kind("RayCronJob")
    assert cron_jobs
    for where, cron in cron_jobs:
        assert len(cron["spec"]["schedule"].split()) == 5, f"{where}: schedule must be a 5-field cron string"
        template = cron["spec"]["jobTemplate"]
        # KubeRay's RayCronJobSpec.JobTemplate is a RayJobSpec: its fields sit directly under it.
        assert "spec" not in template and "entrypoint" in template, where
        assert template == spec, f"{where}: jobTemplate differs from rayjob-pipeline.yaml's spec"
    embedded = [(w, s) for w, s in rayjob_specs() if " data." in w]
    assert embedded, "no RayJob manifest in a ConfigMap for the CronJob"
    for where, s in embedded:
        assert s == spec, f"{where}: RayJob in the ConfigMap differs from rayjob-pipeline.yaml's spec"


def test_cronjob_creates_the_rayjob_with_least_privilege():
    docs = [d for _, d in k8s_docs()]
    cronjobs = [d for d in docs if d["kind"] == "CronJob"]
    assert cronjobs
    for cron in cronjobs:
        spec = cron["spec"]
        assert len(spec["schedule"].split()) == 5
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        sa = pod["serviceAccountName"]
        assert any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa for d in docs)
        bindings = [d for d in docs if d["kind"] == "RoleBinding"
                    and any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in d["subjects"])]
        assert bindings, f"no RoleBinding for {sa}"
        roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
        rules = [r for b in bindings for r in roles[b["roleRef"]["name"]]["rules"]]
        assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules)
        assert all(set(r["verbs"]) <= {"create", "get", "list"} for r in rules), "scheduler role grants too much"
        # The container runs `kubectl create -f <file>` on a file of a mounted ConfigMap holding a RayJob.
        container = pod["containers"][0]
        argv = container.get("command", []) + container.get("args", [])
        target = Path(argv[argv.index("-f") + 1])
        assert "create" in argv
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        hits = [n for n, p in mounts.items() if target.parent == Path(p)]
        assert hits, f"{target} is not on a mounted volume"
        cm_name = volumes[hits[0]]["configMap"]["name"]
        cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
        job = yaml.safe_load(cm["data"][target.name])
        assert job["kind"] == "RayJob" and "generateName" in job["metadata"], "nightly RayJobs need generateName"


# ---------------------------------------------------------------- entrypoints validate

def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def _subset(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _subset(v, actual[k]) for k, v in expected.items())
    return expected == actual


@pytest.mark.parametrize("where,entrypoint", entrypoints(), ids=[w for w, _ in entrypoints()])
def test_entrypoint_module_and_config_exist_and_validate(where, entrypoint, monkeypatch):
    module, args = parse_entrypoint(entrypoint)
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{where}: {module} does not exist"
    assert "--config" in args, f"{where}: entrypoint must name a --config file"
    config = args[args.index("--config") + 1]
    assert (REPO / config).is_file(), f"{where}: config {config} does not exist"
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert all(o.split("=", 1)[1].startswith("s3://") for o in overrides if o.split("=", 1)[0].endswith("output")), \
        f"{where}: cluster outputs must go to s3://"

    # The job's own CLI with --dry-run: the same parsing and validation the cluster runs.
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    with redirect_stdout(out):
        rc = importlib.import_module(module).main(args + ["--dry-run"])
    assert rc == 0, f"{where}: `{entrypoint} --dry-run` exited {rc}"
    header, _, body = out.getvalue().partition("\n")
    assert re.match(r"# \w+Config \(hash [0-9a-f]+\)", header), header
    resolved = yaml.safe_load(body)
    for text in overrides:
        key, raw = text.split("=", 1)
        want = yaml.safe_load(raw)
        got = _lookup(resolved, key) if want is not None else resolved.get(key.split(".")[-1])
        assert _subset(want, got), f"{where}: --set {text} resolved to {got!r}"


def test_a_broken_override_fails_validation(monkeypatch):
    """The check above can fail: a misspelt field exits 2."""
    where, entrypoint = entrypoints()[0]
    module, args = parse_entrypoint(entrypoint)
    monkeypatch.chdir(REPO)
    with redirect_stdout(io.StringIO()):
        assert importlib.import_module(module).main(args + ["--set", "no_such_field=1", "--dry-run"]) == 2


# ---------------------------------------------------------------- Serve

def deployment_names(app: Any) -> set[str]:
    """Names of the deployments bound in a Serve application graph (no Serve started)."""
    from ray.serve.deployment import Application

    names: set[str] = set()
    stack = [app]
    while stack:
        node = stack.pop()
        if isinstance(node, Application):
            bound = node._bound_deployment
            names.add(bound.name)
            stack.extend(list(bound.init_args) + list(bound.init_kwargs.values()))
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return names


def build_application(app_spec: dict[str, Any]) -> Any:
    """Resolve import_path as Serve does and build the application from its args."""
    from ray.serve.deployment import Application

    module_name, _, attr = app_spec["import_path"].partition(":")
    if not attr:
        module_name, _, attr = app_spec["import_path"].rpartition(".")
    target = getattr(importlib.import_module(module_name), attr)
    if isinstance(target, Application):
        return target
    assert callable(target), f"{app_spec['import_path']} is neither an Application nor a builder"
    return target(app_spec.get("args") or {})


def test_repo_serve_configs_import_paths_resolve_to_applications(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    configs = repo_serve_configs()
    assert configs, "no Serve config (configs/*.yaml with applications) in the repo"
    monkeypatch.chdir(REPO)
    for name, data in configs.items():
        ServeDeploySchema.model_validate(data)
        for app in data["applications"]:
            assert deployment_names(build_application(app)), f"{name}: {app['name']} has no deployments"


def test_rayservice_serves_the_repo_serve_applications(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    services = docs_of_kind("RayService")
    assert services
    repo_apps = {a["name"]: a for data in repo_serve_configs().values() for a in data["applications"]}
    monkeypatch.chdir(REPO)
    for where, svc in services:
        serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
        ServeDeploySchema.model_validate(serve_config)
        apps = {a["name"]: a for a in serve_config["applications"]}
        prefixes = [a.get("route_prefix", "/") for a in serve_config["applications"]]
        assert len(set(prefixes)) == len(prefixes), f"{where}: apps share a route_prefix {prefixes}"
        assert set(apps) == set(repo_apps), f"{where}: applications {sorted(apps)} != repo {sorted(repo_apps)}"
        for name, app in apps.items():
            cluster_only = {k: v for k, v in app.items() if k != "deployments"}
            assert cluster_only == repo_apps[name], f"{where}: app {name} differs from the repo's Serve config"
            # Per-cluster deployment overrides must name deployments the app really has.
            known = deployment_names(build_application(app))
            for dep in app.get("deployments", []):
                assert dep["name"] in known, f"{where}: {name} has no deployment {dep['name']} ({sorted(known)})"
        gpu_overrides = [d for a in apps.values() for d in a.get("deployments", [])
                         if d.get("ray_actor_options", {}).get("num_gpus")]
        assert gpu_overrides and all("autoscaling_config" in d for d in gpu_overrides), where
        spec = svc["spec"]["rayClusterSpec"]
        check_cluster_spec(where, spec)
        for tmpl in pod_templates(spec):
            for c in tmpl["spec"]["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                keys = env.get("EMBEDFORGE_API_KEYS")
                assert keys and "secretKeyRef" in keys.get("valueFrom", {}), f"{where}: API keys must come from a Secret"


# ---------------------------------------------------------------- secrets, Dockerfile, ray up

CREDENTIAL_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)secret_access_key"),
    re.compile(r"(?i)aws_session_token"),
    re.compile(r"(?i)password\s*:"),
    re.compile(r"(?i)\b(api[_-]?key|token|secret)\s*[:=]\s*['\"]?[A-Za-z0-9/+_\-]{20,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def test_no_credentials_anywhere_in_infra():
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            hit = pattern.search(text)
            assert not hit, f"{path}: credential-looking text {hit.group(0)!r}"


def test_secret_looking_env_vars_come_from_secrets():
    for where, doc in k8s_docs():
        stack = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if "name" in node and ("value" in node or "valueFrom" in node) and \
                        re.search(r"(?i)key|token|secret|password", str(node["name"])):
                    assert "value" not in node, f"{where}: env {node['name']} is inline; use secretKeyRef"
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    kinds = {d["kind"] for _, d in k8s_docs()}
    assert "Secret" not in kinds or all(not d.get("data") and not d.get("stringData")
                                        for _, d in docs_of_kind("Secret")), "no Secret values in the repo"


def test_dockerfile_copy_sources_exist():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies
    targets = re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M)
    assert {"cpu", "gpu"} <= set(targets)
    for parts in copies:
        flags = [p for p in parts if p.startswith("--")]
        paths = [p for p in parts if not p.startswith("--")]
        context = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        if context in targets:
            continue  # an earlier build stage of this Dockerfile
        if context is not None:
            # A named build context, documented with its --build-context flag.
            assert f"--build-context {context}=" in text, f"COPY --from={context}: undocumented build context"
            continue
        for src in paths[:-1]:
            assert (REPO / src).exists(), f"Dockerfile COPY source {src} does not exist"


def test_cluster_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_LAUNCHER.read_text())
    for field in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers"):
        assert field in raw, f"cluster.yaml: {field} missing"
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"]
    assert not any(k.lower().startswith("aws_") for k in raw["provider"]), "no keys in the provider section"
    config = prepare_config(copy.deepcopy(raw))  # fills defaults as `ray up` does, no AWS call
    validate_config(config)  # Ray's JSON schema for cluster configs
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert any("g" in v["node_config"]["InstanceType"].split(".")[0] and v["max_workers"] > v["min_workers"]
               for v in workers.values()), "no autoscaling GPU worker type"
    for name, node_type in types.items():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), \
            f"{name}: S3 access must come from an instance profile"
    assert any(".[gpu]" in cmd for cmd in config["setup_commands"]), "setup_commands must install the gpu extra"
    mounts = config["file_mounts"]
    assert "." in mounts.values(), "file_mounts must sync the repo"
