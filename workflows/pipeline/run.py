"""``run_pipeline(config)``: run the configured stages in order, skipping finished ones.

Each stage's output lives at ``<output>/<stage>/<key>`` (:meth:`PipelineConfig.plan`: the key
hashes the stage's content hash with references replaced by the referenced stage's key, so a
change upstream changes every key downstream, and the data snapshot of the datasets it reads,
:mod:`workflows.pipeline.snapshot`: new data under the same config gets a new key). Every stage runs through :meth:`Stage.run`, the
one committed-run rule (:mod:`embedforge.committed`): a stage committed by the same config is
skipped and its recorded result reused; nothing stale is ever returned. The lineage file
``<output>/lineage/<name>.json`` records, for each stage, its config, key, output, manifest, code
version and timings: which data, config and code made each model.

Before any cluster work every stage's checks run (:meth:`PipelineConfig.check`: API-key
variables, few-shot data), so those errors exit with code 2 like a bad key.

Deploy serves the new model when the gate promotes it (or when no gate is configured): the Serve
app of the same name is updated in place (``serve.run``). On reject the served model stays the
one in production, the gate's baseline: every ``${train.model}`` in the deploy section resolves to
``gate.baseline.model`` instead (or, with no baseline model, deploy is skipped).
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from embedforge import storage
from embedforge.errors import EmbedforgeError
from embedforge.runtime import init_ray
from workflows.pipeline.config import PipelineConfig, stage_key  # noqa: F401 (stage_key: part of this API)
from workflows.pipeline.stages import DEPLOY

log = logging.getLogger(__name__)


def code_version() -> dict[str, str]:
    """The git commit (and whether the tree is dirty) of the code running this pipeline."""
    from importlib.metadata import version

    repo = Path(__file__).resolve().parents[2]
    out = {"embedforge": version("embedforge")}
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            out["git_commit"] = rev.stdout.strip()
            out["git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass  # not a git checkout (e.g. a container image): the package version identifies the code
    return out


def embed_sample(url: str, model: str, texts: list[str], api_key: str | None) -> dict[str, Any]:
    """Embed ``texts`` through the deployed OpenAI-compatible endpoint (real HTTP)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", timeout=60, max_retries=2)
    resp = client.embeddings.create(model=model, input=texts)
    return {"model": resp.model, "n": len(resp.data), "dims": len(resp.data[0].embedding),
            "prompt_tokens": resp.usage.prompt_tokens}


def _deploy(config: PipelineConfig, lookup, root: str) -> dict[str, Any]:
    import os

    serve_cfg = config.build_stage("deploy", lookup, output=storage.join(root, "deploy"))
    summary = DEPLOY.run(serve_cfg).result.model_dump()
    key = None
    if serve_cfg.auth.mode != "disabled" and serve_cfg.auth.api_keys_env:
        key = (os.environ.get(serve_cfg.auth.api_keys_env) or "").split(",")[0] or None
    summary["sample"] = embed_sample(summary["url"], serve_cfg.default_model_name, config.deploy_sample, key)
    return summary


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run the plan; returns output, lineage URI, status per stage, results (typed) and the gate's verdict."""
    root = config.output
    config.check()
    plan = config.plan()
    init_ray(config.ray)
    results: dict[str, Any] = {}
    lineage: dict[str, Any] = {"name": config.name, "code": code_version(), "started_at": time.time(), "stages": {}}

    def lookup(stage: str, key: str) -> Any:
        if stage not in results:
            raise EmbedforgeError(f"${{{stage}.{key}}}: stage {stage!r} has not run")
        value = getattr(results[stage], key, None)
        if value is None:
            raise EmbedforgeError(f"${{{stage}.{key}}}: the {stage} result has no value for {key!r}")
        return value

    for p in plan:
        stage_config = config.build_stage(p.section, lookup, output=p.output)
        start = time.time()
        log.info("stage %s -> %s", p.section, p.output)
        done = p.stage.run(stage_config, name=p.section)
        status = "skipped (complete)" if done.status == "skipped" else "ran"
        results[p.section] = done.result
        lineage["stages"][p.section] = {
            "status": status, "stage": p.stage.name, "key": p.key, "content_hash": done.content_hash,
            "output": p.output, "seconds": round(time.time() - start, 1), "inputs": p.inputs,
            "config": stage_config.model_dump(mode="json"),
            "manifest": storage.read_manifest(p.output) if storage.is_committed(p.output) else None,
        }
        log.info("[pipeline] %s: %s in %ss -> %s", p.section, status, lineage["stages"][p.section]["seconds"],
                 p.output)

    gate = results["gate"].gate if "gate" in results else None
    promote = gate is None or gate.get("decision") == "promote"
    lineage["gate"] = gate
    deployed = None
    if config.deploy is not None:
        baseline = ((config.gate or {}).get("baseline") or {}).get("model")
        if promote:
            deployed = _deploy(config, lookup, root)
            status = "ran (new model)"
        elif baseline:
            def keep_baseline(stage: str, key: str) -> Any:
                return baseline if (stage, key) == ("train", "model") else lookup(stage, key)

            deployed = _deploy(config, keep_baseline, root)
            status = f"ran (gate rejected: still serving {baseline})"
        else:
            status = "skipped (gate rejected)"
        lineage["stages"]["deploy"] = {"status": status, "reasons": (gate or {}).get("reasons"),
                                       **({k: deployed[k] for k in ("url", "sample")} if deployed else {})}
    lineage["finished_at"] = time.time()
    lineage_uri = storage.join(root, "lineage", f"{config.name}.json")
    storage.write_json(lineage_uri, lineage)
    # Every run's record stays (the file above is the latest): which night promoted or rejected what.
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(lineage["started_at"]))
    storage.write_json(storage.join(root, "lineage", config.name, f"{started}.json"), lineage)
    return {"output": root, "lineage": lineage_uri, "stages": {s: v["status"] for s, v in lineage["stages"].items()},
            "results": results, "deploy": deployed, "promote": promote}
