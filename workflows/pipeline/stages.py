"""The stages, one typed object each: config class, result model, content hash, checks, run function.

Every stage that commits an output runs through one rule, :func:`embedforge.committed.committed_run`
(skip when committed with the same content hash, refuse or redo when another config committed it,
withdraw the manifest while running). ``jobs/<stage>.py`` and the pipeline both call
:meth:`Stage.run`, so a stage resumes the same way alone and inside the DAG.

The config classes and run functions are named by import path and imported on first use: stage
packages pull in heavy code (Ray Data, torch), and a config must validate fast.

:meth:`Stage.check` holds what a config model cannot see: the environment (API-key variables),
data the config names (few-shot examples per language). Jobs and the pipeline call it before any
cluster work, so those errors exit with code 2 too.

A stage's result model declares the fields later stages may reference (``${train.model}``); the
pipeline checks every reference against them when its config is loaded. Results may carry more
(``extra="allow"``): what a stage reports beyond them is kept, but cannot be referenced.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from embedforge.committed import OnConflict, committed_run
from embedforge.config import StrictModel
from embedforge.errors import ConfigError

# ---------------------------------------------------------------- results


class StageResult(BaseModel):
    """What every committed stage returns: where it wrote and its manifest."""

    model_config = ConfigDict(extra="allow", frozen=True)

    output: str = Field(description="The committed output prefix")
    manifest: dict[str, Any] | None = Field(None, description="Its _MANIFEST.json")


class SynthesizeResult(StageResult):
    report: Any = Field(None, description="Report files (the translation QE summary and plots)")
    shards_written: list[str] = Field(default_factory=list, description="Shards this run wrote (0 on a resume)")


class RewardResult(StageResult):
    rows: int = Field(0, description="Rows written over every reward output")
    quarantined: int = Field(0, description="Rows quarantined with a reason")
    report: list[str] | None = Field(None, description="Report files (PNGs, summary.json)")


class TrainResult(StageResult):
    model: str = Field(description="URI of the exported sentence-transformers folder")
    curve: str | None = Field(None, description="URI of the training curve PNG")
    steps: int = Field(0, description="Optimizer steps")
    dev_metrics: dict[str, Any] = Field(default_factory=dict, description="Dev metrics of the exported checkpoint")
    base_dev_metrics: dict[str, Any] = Field(default_factory=dict, description="Dev metrics before step 1")
    final_train_loss: float | None = Field(None, description="Mean train loss of the last logged window")


class EvaluateResult(StageResult):
    model: str = Field(description="The evaluated model")
    split: str = Field(description="dev or test")
    metrics: dict[str, float] = Field(default_factory=dict, description="Main metric per dataset key")
    tasks: dict[str, float] = Field(default_factory=dict, description="Mean per task")
    mean: float | None = Field(None, description="Mean of the task means")
    baseline: dict[str, Any] | None = Field(None, description="The baseline's model, tasks and mean")
    gate: dict[str, Any] | None = Field(None, description="The gate's decision and reasons")
    report: str = Field(description="URI of report.json")
    plots: list[str] = Field(default_factory=list, description="URIs of the report's PNGs")


class ServeResult(BaseModel):
    """A deployed Serve app (nothing is committed: the app runs)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    url: str = Field(description="Base URL of the app")
    embeddings: str | None = Field(None, description="URL of /v1/embeddings")


# ---------------------------------------------------------------- checks before cluster work


def check_api_keys(auth: Any, where: str = "") -> None:
    """An app with ``auth.mode: api_keys`` must find its keys now, not when its replicas start."""
    if auth.mode != "api_keys":
        return
    from workflows.serve.auth import load_api_keys

    if load_api_keys(auth.api_keys_env, auth.api_keys_file):  # a missing file raises ConfigError itself
        return
    found = []
    if auth.api_keys_env:
        found.append(f"${auth.api_keys_env} is {'empty' if auth.api_keys_env in os.environ else 'unset'}")
    if auth.api_keys_file:
        found.append(f"{auth.api_keys_file} holds no keys")
    raise ConfigError(f"{where}auth: no API keys ({'; '.join(found) or 'neither api_keys_env nor api_keys_file'}); "
                      "export the keys, mount the key file, or set auth.mode=disabled for local use")


def check_synthesize(config: Any) -> None:
    if config.translation.prompt_style != "few_shot":
        return
    from workflows.synthesize.prompts import few_shot_examples

    for lang in config.target_langs:
        try:
            few_shot_examples(lang, config.translation.few_shot)
        except ValueError as e:
            raise ConfigError(f"translation.few_shot: {e}") from None


def check_serve(config: Any) -> None:
    check_api_keys(config.auth)


# ---------------------------------------------------------------- the stage object


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """One workflow as the pipeline and the jobs see it."""

    name: str
    config_path: str                       # "package.module:ConfigClass"
    run_path: str                          # "package.module:run_function" (config -> dict)
    result_model: type[BaseModel]
    on_conflict: OnConflict = "refuse"     # another config committed the output: refuse, or redo it
    committed: bool = True                 # False: the stage serves rather than commits (deploy)
    checks: Callable[[Any], None] | None = None

    @property
    def config_class(self) -> type[StrictModel]:
        return _load(self.config_path)

    def content_hash(self, config: StrictModel) -> str:
        """What determines the output (``content_hash`` of the config: not where, not how many replicas)."""
        return config.content_hash()

    def check(self, config: StrictModel) -> None:
        """Checks beyond the config model (environment, named data); ConfigError before any cluster work."""
        if self.checks is not None:
            self.checks(config)

    def run(self, config: StrictModel, name: str | None = None) -> StageRun:
        """Run under the committed-run rule; the result validated into :attr:`result_model`."""
        fn = _load(self.run_path)
        if not self.committed:
            return StageRun(self.result_model.model_validate(fn(config)), "ran", None, None)
        done = committed_run(name or self.name, config.output, self.content_hash(config), lambda: fn(config),
                             self.on_conflict, bool(getattr(config, "overwrite", False)),
                             legacy_hashes=(config.config_hash(),))
        return StageRun(self.result_model.model_validate(done.result), done.status, done.content_hash, done.output)


@dataclass(frozen=True)
class StageRun:
    result: Any                 # the stage's result model
    status: str                 # "ran" or "skipped"
    content_hash: str | None
    output: str | None


SYNTHESIZE = Stage("synthesize", "workflows.synthesize.config:SynthesizeConfig",
                   "workflows.synthesize.pipeline:run_synthesize", SynthesizeResult, "refuse", checks=check_synthesize)
REWARD = Stage("reward", "workflows.reward.config:RewardConfig", "workflows.reward.pipeline:run_reward",
               RewardResult, "refuse")
TRAIN = Stage("train", "workflows.train.config:TrainConfig", "workflows.train.run:run_train", TrainResult, "refuse")
# An evaluation is cheap to redo and holds nothing to resume: another config's report is replaced.
EVALUATE = Stage("evaluate", "workflows.evaluate.config:EvaluateConfig", "workflows.evaluate.run:run_evaluate",
                 EvaluateResult, "redo")
DEPLOY = Stage("deploy", "workflows.serve.config:ServeConfig", "workflows.serve.run:run_serve", ServeResult,
               committed=False, checks=check_serve)

# Pipeline sections in DAG order -> the stage each runs (gate and evaluate are both evaluations).
PIPELINE_STAGES: dict[str, Stage] = {
    "synthesize": SYNTHESIZE, "reward": REWARD, "train": TRAIN, "gate": EVALUATE, "evaluate": EVALUATE,
    "deploy": DEPLOY,
}
