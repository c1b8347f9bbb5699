"""``run_pipeline(config)``: run the configured stages in order, skipping finished ones.

Each stage's output lives at ``<output>/<stage>/<key>``, where ``key`` hashes the stage's
resolved config (references to earlier stages replaced by their output URIs, so a change
upstream changes every key downstream) and the data snapshot of the datasets it reads
(:mod:`workflows.pipeline.snapshot`: new data under the same config gets a new key). A stage whose output is committed and whose summary
record ``<output>/stages/<stage>-<key>.json`` exists is skipped; everything else runs. The
lineage file ``<output>/lineage/<name>.json`` records, for each stage, its config, key,
output, manifest, code version and timings: which data, config and code made each model.

Deploy serves the new model when the gate promotes it (or when no gate is configured): the Serve
app of the same name is updated in place (``serve.run``). On reject the served model stays the
one in production, the gate's baseline: every ``${train.model}`` in the deploy section resolves to
``gate.baseline.model`` instead (or, with no baseline model, deploy is skipped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from embedforge import storage
from embedforge.errors import EmbedforgeError
from embedforge.runtime import init_ray
from workflows.pipeline.config import PipelineConfig
from workflows.pipeline.snapshot import input_snapshot

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


def stage_key(stage: str, resolved: dict[str, Any], content_hash: str | None = None,
              inputs: dict[str, str] | None = None) -> str:
    """Key of a stage's output: its config without output/ray, or the stage's own content hash
    (which also leaves out how many replicas produce the rows) when it defines one, plus the
    fingerprints of the datasets it reads (:func:`workflows.pipeline.snapshot.input_snapshot`)."""
    data = content_hash or {k: v for k, v in resolved.items() if k not in ("output", "ray")}
    blob = json.dumps({"stage": stage, "config": data, "inputs": inputs or {}}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _run_stage(stage: str, config: Any) -> dict[str, Any]:
    if stage == "synthesize":
        from workflows.synthesize.pipeline import run_synthesize as fn
    elif stage == "reward":
        from workflows.reward.pipeline import run_reward as fn
    elif stage == "train":
        from workflows.train.run import run_train as fn
    elif stage in ("gate", "evaluate"):
        from workflows.evaluate.run import run_evaluate as fn
    else:
        raise KeyError(stage)
    return fn(config)


def _is_done(stage: str, record_uri: str, output: str) -> bool:
    return storage.exists(record_uri) and storage.is_committed(output)


def embed_sample(url: str, model: str, texts: list[str], api_key: str | None) -> dict[str, Any]:
    """Embed ``texts`` through the deployed OpenAI-compatible endpoint (real HTTP)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", timeout=60, max_retries=2)
    resp = client.embeddings.create(model=model, input=texts)
    return {"model": resp.model, "n": len(resp.data), "dims": len(resp.data[0].embedding),
            "prompt_tokens": resp.usage.prompt_tokens}


def _deploy(config: PipelineConfig, lookup, root: str) -> dict[str, Any]:
    import os

    from workflows.serve.run import run_serve

    serve_cfg = config.build_stage("deploy", lookup, output=storage.join(root, "deploy"))
    summary = run_serve(serve_cfg)
    key = None
    if serve_cfg.auth.mode != "disabled" and serve_cfg.auth.api_keys_env:
        key = (os.environ.get(serve_cfg.auth.api_keys_env) or "").split(",")[0] or None
    summary["sample"] = embed_sample(summary["url"], serve_cfg.default_model_name, config.deploy_sample, key)
    return summary


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    root = config.output
    init_ray(config.ray)
    summaries: dict[str, dict[str, Any]] = {}
    lineage: dict[str, Any] = {"name": config.name, "code": code_version(), "started_at": time.time(), "stages": {}}

    def lookup(stage: str, key: str) -> Any:
        if stage not in summaries:
            raise EmbedforgeError(f"${{{stage}.{key}}}: stage {stage!r} has not run")
        value = summaries[stage].get(key)
        if value is None:
            raise EmbedforgeError(f"${{{stage}.{key}}}: the {stage} summary has no {key!r} "
                                  f"(it has {', '.join(sorted(summaries[stage]))})")
        return value

    for stage in config.sections():
        if stage == "deploy":
            continue
        probe = config.build_stage(stage, lookup, output="/pending")
        own_hash = probe.content_hash() if hasattr(probe, "content_hash") else None
        inputs = input_snapshot(probe.model_dump(mode="json"), root)
        key = stage_key(stage, probe.model_dump(mode="json"), own_hash, inputs)
        output = storage.join(root, stage, key)
        stage_config = config.build_stage(stage, lookup, output=output)
        record_uri = storage.join(root, "stages", f"{stage}-{key}.json")
        start = time.time()
        if _is_done(stage, record_uri, output):
            summary = storage.read_json(record_uri)
            status = "skipped (complete)"
        else:
            log.info("stage %s -> %s", stage, output)
            summary = json.loads(json.dumps(_run_stage(stage, stage_config), default=str))
            storage.write_json(record_uri, summary)
            status = "ran"
        summaries[stage] = summary
        lineage["stages"][stage] = {
            "status": status, "key": key, "output": output, "seconds": round(time.time() - start, 1),
            "inputs": inputs,
            "config": stage_config.model_dump(mode="json"),
            "manifest": storage.read_manifest(output) if storage.is_committed(output) else None,
        }
        log.info("[pipeline] %s: %s in %ss -> %s", stage, status, lineage["stages"][stage]["seconds"], output)

    gate = summaries.get("gate", {}).get("gate")
    promote = gate is None or gate.get("decision") == "promote"
    lineage["gate"] = gate
    if config.deploy is not None:
        baseline = ((config.gate or {}).get("baseline") or {}).get("model")
        if promote:
            summaries["deploy"] = _deploy(config, lookup, root)
            status = "ran (new model)"
        elif baseline:
            def keep_baseline(stage: str, key: str) -> Any:
                return baseline if (stage, key) == ("train", "model") else lookup(stage, key)

            summaries["deploy"] = _deploy(config, keep_baseline, root)
            status = f"ran (gate rejected: still serving {baseline})"
        else:
            status = "skipped (gate rejected)"
        lineage["stages"]["deploy"] = {"status": status, "reasons": (gate or {}).get("reasons"),
                                       **({k: summaries["deploy"][k] for k in ("url", "sample")}
                                          if "deploy" in summaries else {})}
    lineage["finished_at"] = time.time()
    lineage_uri = storage.join(root, "lineage", f"{config.name}.json")
    storage.write_json(lineage_uri, lineage)
    # Every run's record stays (the file above is the latest): which night promoted or rejected what.
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(lineage["started_at"]))
    storage.write_json(storage.join(root, "lineage", config.name, f"{started}.json"), lineage)
    return {"output": root, "lineage": lineage_uri, "stages": {s: v["status"] for s, v in lineage["stages"].items()},
            "summaries": summaries, "promote": promote}
