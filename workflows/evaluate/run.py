"""``run_evaluate(config)``: datasets -> embeddings (Ray Data actor pool or in-process, cached)
-> sentence-transformers evaluators -> one report (JSON, Markdown, PNG) -> optional gate.

The full model is always evaluated; a ``grid`` adds one row of metrics per (layers, dims) cell
with the encode throughput of that cell, timed on the embedder's own device (in a Ray task with
the embedder's resources when embedding runs on Ray, else in this process).
"""

from __future__ import annotations

import json
import logging
import time
from itertools import product
from pathlib import Path
from typing import Any

from embedforge import storage
from embedforge.elastic import read_grid
from embedforge.errors import InputError
from embedforge.models import resolve_model
from workflows.evaluate.config import EvaluateConfig, GridConfig
from workflows.evaluate.embed import (EmbeddingCache, EmbedRequest, embed_ray, embed_requests, model_fingerprint,
                                      model_prompts)
from workflows.evaluate.gate import decide
from workflows.evaluate.report import deltas, write_report
from workflows.evaluate.tasks import EvalItem, at_depth, build_items, resolve_prompts

log = logging.getLogger(__name__)

Cell = tuple[int | None, int | None]
THROUGHPUT_TIMEOUT_S = 1800


def _depth(path: str) -> int | None:
    cfg = Path(path, "config.json")
    return json.loads(cfg.read_text()).get("num_hidden_layers") if cfg.is_file() else None


def grid_cells(grid: GridConfig | None, model_grid: dict[str, list[int]] | None, depth: int | None) -> list[Cell]:
    """The (layers, dims) cells to evaluate; None = full depth / width. Empty without a grid."""
    if grid is None:
        return []
    layers = grid.layers if grid.layers is not None else (model_grid or {}).get("layers") if grid.from_model else None
    dims = grid.dims if grid.dims is not None else (model_grid or {}).get("dims") if grid.from_model else None
    norm_layers = sorted({None if v is None or (depth is not None and v >= depth) else v for v in (layers or [None])},
                         key=lambda v: (v is None, v or 0))
    return list(product(norm_layers, sorted(set(dims or [None]), key=lambda v: (v is None, v or 0))))


def measure_throughput(embedder: Any, texts: list[str], cells: list[Cell]) -> dict[Cell, float]:
    """Sentences per second of ``embedder.encode`` at each cell (after one warm-up call)."""
    embedder.encode(texts[: min(len(texts), 16)])
    out = {}
    for layers, dims in cells:
        start = time.perf_counter()
        embedder.encode(texts, dimensions=dims, layers=layers)
        out[(layers, dims)] = round(len(texts) / max(time.perf_counter() - start, 1e-9), 1)
    return out


def _throughput_task(embedder_config: dict[str, Any], texts: list[str], cells: list[Cell]) -> dict[Cell, float]:
    from actors.embedder import Embedder

    return measure_throughput(Embedder(embedder_config), texts, cells)


def _summarize(items: list[EvalItem], metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    main = {it.key: metrics[it.key][it.main] for it in items}
    tasks: dict[str, list[float]] = {}
    for it in items:
        tasks.setdefault(it.task, []).append(main[it.key])
    task_means = {t: round(sum(v) / len(v), 4) for t, v in tasks.items()}
    return {"metrics": main, "tasks": task_means,
            "mean": round(sum(task_means.values()) / len(task_means), 4)}


class _LocalEmbedder:
    """Creates the in-process Embedder on first use and keeps it for the throughput probe."""

    def __init__(self, config: dict[str, Any]):
        self.config, self.embedder = config, None

    def __call__(self) -> Any:
        if self.embedder is None:
            from actors.embedder import Embedder

            self.embedder = Embedder(self.config)
        return self.embedder


def evaluate_model(model: str, items: list[EvalItem], config: EvaluateConfig) -> dict[str, Any]:
    """Every item's metrics for ``model`` at full size and at each grid cell."""
    path = resolve_model(model)
    fingerprint = model_fingerprint(path)
    prompts = resolve_prompts(model_prompts(path), config.prompts.symmetric, config.prompts.query,
                              config.prompts.document)
    cells = grid_cells(config.grid, read_grid(path) if Path(path).is_dir() else None, _depth(path))
    depths = list(dict.fromkeys([None, *[c[0] for c in cells]]))
    emb_cfg = config.embed
    # Scores in float32 on every machine: metrics stay comparable across CPUs and with published
    # references (dtype auto would evaluate in bf16 on GPUs and AVX512_BF16 CPUs: +-0.15 Spearman seen).
    embedder_config = {"model": model, "batch_size": emb_cfg.batch_size, "normalize": True, "prompt": None,
                       "dtype": "float32",
                       "max_seq_length": emb_cfg.max_seq_length, "num_cpus": emb_cfg.num_cpus,
                       "num_gpus": emb_cfg.num_gpus, "device": "cuda" if emb_cfg.num_gpus > 0 else "cpu"}
    data_key = f"{config.split}"
    plan: list[tuple[str, int | None, str, EmbedRequest]] = []
    for it in items:
        base = it.requests(prompts, None, data_key)
        for depth in depths:
            plan += [(it.key, depth, role, r) for role, r in at_depth(base, depth).items()]
    local = _LocalEmbedder(embedder_config)
    ray_used = False

    def ray_embed(reqs: list[EmbedRequest]) -> list:
        nonlocal ray_used
        from embedforge.runtime import check_resources, init_ray

        init_ray(config.ray)
        check_resources(emb_cfg.num_cpus, emb_cfg.num_gpus, "evaluate embedder", config.ray.fail_fast_on_missing_gpus)
        ray_used = True
        return embed_ray(reqs, embedder_config, emb_cfg.actors, emb_cfg.batch_size)

    cache = EmbeddingCache(emb_cfg.cache_dir, fingerprint)
    embs, stats = embed_requests([p[3] for p in plan], cache, emb_cfg.mode, emb_cfg.local_max_texts, local,
                                 ray_embed)
    by: dict[tuple[str, int | None], dict[str, Any]] = {}
    for (key, depth, role, _), emb in zip(plan, embs):
        by.setdefault((key, depth), {})[role] = emb

    full = {it.key: it.evaluate(by[(it.key, None)], None) for it in items}
    result = {"model": model, "path": path, "fingerprint": fingerprint, "prompts": prompts,
              "details": full, **_summarize(items, full), "embedding": stats.as_dict(), "grid": []}
    if cells:
        sample = list(dict.fromkeys(t for it in items for texts in it.texts.values() for t in texts))
        sample = sample[: config.grid.throughput_sentences]
        if ray_used or emb_cfg.mode == "ray":
            import ray

            from embedforge.runtime import init_ray

            init_ray(config.ray)
            task = ray.remote(num_cpus=emb_cfg.num_cpus, num_gpus=emb_cfg.num_gpus)(_throughput_task)
            speeds = ray.get(task.remote(embedder_config, sample, cells), timeout=THROUGHPUT_TIMEOUT_S)
        else:
            speeds = measure_throughput(local(), sample, cells)
        for layers, dims in cells:
            metrics = {it.key: it.evaluate(by[(it.key, layers)], dims) for it in items}
            result["grid"].append({"layers": layers, "dims": dims, "throughput": speeds[(layers, dims)],
                                   **_summarize(items, metrics)})
    return result


def run_evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate the model (and baseline), write the report under ``config.output``, apply the gate."""
    items = build_items(config.tasks, config.split)
    log.info("evaluating %s on %d datasets (%s split)", config.model, len(items), config.split)
    candidate = evaluate_model(config.model, items, config)
    baseline = None
    if config.baseline is not None and config.baseline.model is not None:
        baseline = evaluate_model(config.baseline.model, items, config)
    elif config.baseline is not None:
        baseline = storage.read_json(config.baseline.report)
        if not isinstance(baseline, dict) or "metrics" not in baseline:
            raise InputError(f"baseline.report {config.baseline.report!r} is not a report.json of this job")
        baseline = {k: v for k, v in baseline.items() if k not in ("baseline", "deltas", "gate")}
    report: dict[str, Any] = {"split": config.split, **candidate,
                              "main_metric_names": {it.key: it.main for it in items},
                              "config": config.model_dump(mode="json"), "config_hash": config.content_hash()}
    if baseline is not None:
        report["baseline"] = {**baseline, "split": baseline.get("split", config.split)}
        report["deltas"] = deltas(candidate, baseline)
    if config.gate is not None and baseline is not None:
        report["gate"] = decide(report, report["baseline"], config.gate).as_dict()
    manifest = write_report(config.output, report)
    gate = report.get("gate")
    return {"output": config.output, "manifest": manifest, "model": config.model, "split": config.split,
            "metrics": candidate["metrics"], "tasks": candidate["tasks"], "mean": candidate["mean"],
            "grid": [{k: c[k] for k in ("layers", "dims", "throughput", "mean")} for c in candidate["grid"]],
            "baseline": None if baseline is None else {"model": baseline["model"], "tasks": baseline["tasks"],
                                                        "mean": baseline["mean"]},
            "gate": gate, "embedding": candidate["embedding"],
            "report": storage.join(config.output, "report.json"),
            "plots": [storage.join(config.output, p) for p in manifest["files"] if p.endswith(".png")]}
