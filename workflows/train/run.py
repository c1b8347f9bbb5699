"""``run_train(config)``: validate the mixture, train on Ray Train, export and commit the model.

Output layout under ``config.output``::

    checkpoints/<run_name>/...   Ray Train's run folder (checkpoints, best K kept by the dev metric)
    model/                       the exported SentenceTransformer folder (+ _MANIFEST.json)
    history.json                 every reported step's metrics
    training_curve.png           loss and dev Spearman against steps
    _MANIFEST.json               committed last: model URI, metrics, data manifests

Rerunning with the same ``output`` and ``run_name`` restores Ray Train's run state from storage
and continues from its latest checkpoint (``ray.train.get_checkpoint()`` in the loop).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedforge import storage
from embedforge.errors import EngineError, InputError
from embedforge.runtime import check_resources, init_ray
from workflows.train.config import TrainConfig

log = logging.getLogger(__name__)


def load_dev(config: TrainConfig) -> dict[str, list] | None:
    from embedforge import schemas as S
    from embedforge.data import forbid_test_split, load_dataset

    spec = config.dev.dataset
    if spec is None:
        return None
    forbid_test_split(spec, "checkpoint selection")
    df = load_dataset(spec)
    S.require_columns(df.columns, [S.SENTENCE1, S.SENTENCE2, S.SCORE], f"dev dataset {spec.source}:{spec.split}")
    if df.height == 0:
        raise InputError(f"dev dataset {spec.source}:{spec.split} is empty")
    return {c: df[c].to_list() for c in (S.SENTENCE1, S.SENTENCE2, S.SCORE)}


def storage_location(output: str) -> tuple[str, Any]:
    """``(storage_path, filesystem)`` for Ray Train's RunConfig (no scheme when a filesystem is given)."""
    fs, path = storage.resolve(storage.join(output, "checkpoints"))
    return path, (fs if storage.is_s3(output) else None)


def build_trainer(config: TrainConfig, step_callback: Callable[[int, int], None] | None = None):
    """Load and check the data (before any worker starts), then the TorchTrainer; returns (trainer, facts)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from embedforge.models import resolve_model
    from workflows.train.mixture import load_mixture, schedule_for

    mixture = load_mixture(config)
    dev = load_dev(config)
    schedule = schedule_for(config, [d.rows for d in mixture])
    total_steps = schedule.total
    base_model = resolve_model(config.model.base)
    sc = config.scaling
    check_resources(sc.num_workers * sc.cpus_per_worker, sc.num_workers if sc.use_gpu else 0, "training workers",
                    config.ray.fail_fast_on_missing_gpus)
    loop_config = {
        "config": config.model_dump(mode="json"),
        "tables": [ray.put(d.table) for d in mixture],
        "dev": ray.put(dev) if dev is not None else None,
        "schedule": schedule,
        "total_steps": total_steps,
        "base_model": base_model,
        "step_callback": step_callback,
    }
    storage_path, fs = storage_location(config.output)
    ck = config.checkpoint
    run_config = RunConfig(
        name=config.run_name, storage_path=storage_path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=config.failure.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=ck.keep_best_k, checkpoint_score_attribute=ck.metric,
                                           checkpoint_score_order=ck.mode),
    )
    from workflows.train.loop import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker={"CPU": sc.cpus_per_worker, **sc.resources_per_worker}),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        run_config=run_config,
    )
    facts = {"mixture": mixture, "total_steps": total_steps, "base_model": base_model, "schedule": schedule}
    return trainer, facts


def _read_checkpoint_file(checkpoint, name: str) -> bytes:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return f.read()


def _history(checkpoint) -> list[dict]:
    from workflows.train.loop import HISTORY_FILE

    return json.loads(_read_checkpoint_file(checkpoint, HISTORY_FILE))


def _dev_only(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k.startswith("dev_")}


def phase_summary(config: TrainConfig, schedule) -> list[dict[str, Any]]:
    """Each phase's name, step range and datasets (one phase named ``train`` without ``phases``)."""
    labels = iter(config.item_labels())
    return [{"name": phase.name, "first_step": start + 1, "last_step": start + steps,
             "datasets": [next(labels) for _ in phase.datasets]}
            for phase, start, steps in zip(config.phase_list(), schedule.starts, schedule.steps)]


def run_train(config: TrainConfig, step_callback: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train ``config``; return a JSON-able summary with the model URI, metrics and the manifest."""
    from ray.train import TrainingFailedError

    from workflows.train.export import export_model, plot_curve

    init_ray(config.ray)
    trainer, facts = build_trainer(config, step_callback)
    # a rerun rewrites model/ and the curve: the output stops looking complete until the new commit
    storage.delete(storage.manifest_uri(config.output))
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise EngineError(f"training run {config.run_name!r} failed after {config.failure.max_failures} "
                          f"restarts: {e}") from e
    if result.checkpoint is None:
        raise EngineError(f"training run {config.run_name!r} finished without a checkpoint")
    ck = config.checkpoint
    chosen, chosen_metrics = result.checkpoint, result.metrics or {}
    if ck.export == "best" and result.best_checkpoints:
        ranked = [(c, m) for c, m in result.best_checkpoints if ck.metric in m]
        if ranked:
            pick = max if ck.mode == "max" else min
            chosen, chosen_metrics = pick(ranked, key=lambda cm: cm[1][ck.metric])
    history = _history(result.checkpoint)
    dev_metrics = _dev_only(chosen_metrics)
    base_dev = _dev_only(history[0]) if history and history[0]["step"] == 0 else {}  # scored before step 1
    info = {
        "run_name": config.run_name, "base_model": config.model.base, "num_workers": config.scaling.num_workers,
        "steps": facts["total_steps"], "checkpoint": chosen.path, "export": ck.export,
        "checkpoint_step": chosen_metrics.get("step"), "dev_metrics": dev_metrics, "base_dev_metrics": base_dev,
        "config": config.model_dump(mode="json"), "phases": phase_summary(config, facts["schedule"]),
        "datasets": [{"label": d.label, "rows": d.rows, "objective": item.objective.model_dump(mode="json"),
                      "weight": item.weight, "manifest": d.manifest}
                     for d, item in zip(facts["mixture"], config.items())],
    }
    model_uri = export_model(chosen, storage.join(config.output, "model"), info,
                             [item.objective for item in config.items()])
    grid = info["elastic_grid"]
    storage.write_json(storage.join(config.output, "history.json"), history)
    with tempfile.TemporaryDirectory(prefix="ef-curve-") as tmp:
        png = plot_curve(history, Path(tmp) / "training_curve.png")
        storage.write_bytes(storage.join(config.output, "training_curve.png"), png.read_bytes())
    final = history[-1] if history else {}
    manifest = storage.commit(config.output, {
        "kind": "train", "model": model_uri, "config_hash": config.config_hash(), "run_name": config.run_name,
        "steps": facts["total_steps"], "dev_metrics": dev_metrics, "base_dev_metrics": base_dev,
        "final_train_loss": final.get("train_loss"), "elastic_grid": grid, "phases": info["phases"],
        "files": ["history.json", "training_curve.png"],
        "datasets": json.loads(json.dumps(info["datasets"], default=str)),
    })
    return {"output": config.output, "model": model_uri, "curve": storage.join(config.output, "training_curve.png"),
            "steps": facts["total_steps"], "dev_metrics": dev_metrics, "base_dev_metrics": base_dev,
            "final_train_loss": final.get("train_loss"), "manifest": manifest}
