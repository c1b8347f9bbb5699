"""Reading the manifests under infra/k8s: documents by kind, every RayJob spec (also those in
RayCronJob templates and ConfigMaps) and their ``python -m jobs.<stage>`` entrypoints.
Shared by tests/test_infra.py and tests/test_jobs_submit.py.
"""

from __future__ import annotations

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
