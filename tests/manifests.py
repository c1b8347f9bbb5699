"""Reading the manifests under infra/k8s: documents by kind, every RayJob spec (also those in
RayCronJob templates and ConfigMaps) and their ``python -m jobs.<stage>`` entrypoints.
Shared by tests/test_infra.py and tests/test_jobs_submit.py.
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """(file:index, document) for every YAML document under infra/k8s."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.relative_to(REPO)}:{i}", doc))
    return out


def docs_of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(where, d) for where, d in k8s_docs() if d.get("kind") == kind]


def rayjob_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayJob spec: RayJob objects, RayCronJob templates, RayJobs inside ConfigMaps."""
    specs = [(where, d["spec"]) for where, d in docs_of_kind("RayJob")]
    specs += [(f"{where} jobTemplate", d["spec"]["jobTemplate"]) for where, d in docs_of_kind("RayCronJob")]
    for where, d in docs_of_kind("ConfigMap"):
        for key, text in (d.get("data") or {}).items():
            embedded = yaml.safe_load(text)
            if isinstance(embedded, dict) and embedded.get("kind") == "RayJob":
                specs.append((f"{where} data.{key}", embedded["spec"]))
    return specs


def entrypoints() -> list[tuple[str, str]]:
    return [(where, spec["entrypoint"]) for where, spec in rayjob_specs()]


def pod_templates(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]


def repo_serve_configs() -> dict[str, dict[str, Any]]:
    """The repo's Serve config files: configs/*.yaml holding top-level ``applications``."""
    out = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "applications" in data:
            out[path.name] = data
    return out


def parse_entrypoint(text: str) -> tuple[str, list[str]]:
    argv = shlex.split(text)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), f"not `python -m jobs.<stage> ...`: {text}"
    return argv[2], argv[3:]


# ---------------------------------------------------------------- schema validation

CRD_DIR = REPO.parent / "shared" / "kuberay" / "crds-v1.6.0"
K8S_VERSION = "1.33.0"  # built-in kinds are checked against this Kubernetes release's schemas
BUILTIN_GROUPS = ("v1", "batch/v1", "rbac.authorization.k8s.io/v1", "networking.k8s.io/v1")
OBJECT_META_KEYS = {"name", "generateName", "namespace", "labels", "annotations"}


def _strict(node: Any) -> Any:
    """An OpenAPI v3 CRD schema as JSON Schema with the API server's strict field validation:
    every object with ``properties`` rejects other keys unless it preserves unknown fields, and
    ``x-kubernetes-int-or-string`` accepts either type."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: (_strict(v) if k != "properties" else {name: _strict(s) for name, s in v.items()})
           for k, v in node.items()}
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


@functools.lru_cache(maxsize=None)
def _crds() -> tuple[tuple[str, dict[str, Any]], ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 4 MB of YAML
    return tuple((p.name, yaml.load(p.read_text(), Loader=loader)) for p in sorted(CRD_DIR.glob("*.yaml")))


@functools.lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON Schema of that served CRD version."""
    out = {}
    for _, crd in _crds():
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                out[(f"{group}/{version['name']}", kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return out


def cel_rules() -> set[tuple[str, str]]:
    """(CRD file, rule) of every x-kubernetes-validations rule: JSON Schema cannot evaluate CEL,
    so tests/test_infra.py checks these rules by hand and this list tells when a CRD adds one."""
    found: set[tuple[str, str]] = set()

    def walk(node: Any, name: str) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                found.add((name, rule["rule"]))
            for v in node.values():
                walk(v, name)
        elif isinstance(node, list):
            for v in node:
                walk(v, name)

    for name, crd in _crds():
        walk(crd, name)
    return found


def schema_errors(doc: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]] | None = None) -> list[str]:
    """Why the API server would reject ``doc`` (strict field validation); [] when it would not."""
    import jsonschema

    key = (doc.get("apiVersion"), doc.get("kind"))
    schemas = crd_schemas() if schemas is None else schemas
    if key in schemas:
        errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                  for e in jsonschema.Draft7Validator(schemas[key]).iter_errors(doc)]
        extra = set(doc.get("metadata", {})) - OBJECT_META_KEYS
        return errors + ([f"metadata: unexpected keys {sorted(extra)}"] if extra else [])
    if key[0] in BUILTIN_GROUPS:
        return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                for e in _builtin_validator(*key).iter_errors(doc)]
    return [f"no schema for apiVersion/kind {key}"]


@functools.lru_cache(maxsize=None)
def _builtin_validator(api_version: str, kind: str) -> Any:
    """The strict JSON Schema kubernetes-validate ships for a built-in kind of K8S_VERSION (its
    ``validate`` reloads the 10 MB definitions file on every call; this loads it once)."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = schema_contents(f"{folder}/{kind.lower()}-{group}.json", K8S_VERSION)
    registry = Resource.from_contents(schema_contents(f"{folder}/_definitions.json", K8S_VERSION)) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=Resource.from_contents(schema) @ registry)


def all_resources() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object under infra/k8s, including RayJobs embedded in ConfigMaps."""
    out = [(w, d) for w, d in k8s_docs() if d.get("kind") != "Kustomization"]
    for where, d in docs_of_kind("ConfigMap"):
        for key, text in (d.get("data") or {}).items():
            embedded = yaml.safe_load(text)
            if isinstance(embedded, dict) and "apiVersion" in embedded:
                out.append((f"{where} data.{key}", embedded))
    return out
