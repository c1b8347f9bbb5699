"""The main job's config: the stages of one run, wired by ``${stage.key}`` references.

Each stage section holds that stage's own config (SynthesizeConfig, RewardConfig, TrainConfig,
EvaluateConfig for the gate and for the final report, ServeConfig for deploy) without
``output`` and ``ray``: the pipeline owns both. A string ``${train.model}`` anywhere in a
section is replaced by the ``model`` value of the train stage's summary, ``${synthesize.output}``
by that stage's output URI, and so on; a reference may only point at an earlier stage.

Validation builds every stage config up front (references replaced by placeholders), so a bad
pipeline config exits with code 2 before any cluster work, naming ``<stage>.<field>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import Field, ValidationError, model_validator

from embedforge.config import StrictModel, format_validation_error
from embedforge.runtime import RayConfig

# Stage order is the DAG: each stage may reference the outputs of the stages before it.
STAGES = ("synthesize", "reward", "train", "gate", "evaluate", "deploy")
REF = re.compile(r"\$\{(\w+)\.(\w+)\}")


def stage_config_class(stage: str) -> type[StrictModel]:
    """The config model of a stage (imported lazily: stage packages pull in heavy code)."""
    if stage == "synthesize":
        from workflows.synthesize.config import SynthesizeConfig as cls
    elif stage == "reward":
        from workflows.reward.config import RewardConfig as cls
    elif stage == "train":
        from workflows.train.config import TrainConfig as cls
    elif stage in ("gate", "evaluate"):
        from workflows.evaluate.config import EvaluateConfig as cls
    elif stage == "deploy":
        from workflows.serve.config import ServeConfig as cls
    else:
        raise KeyError(stage)
    return cls


def substitute(value: Any, lookup: Callable[[str, str], Any]) -> Any:
    """Replace ``${stage.key}`` references in nested YAML data with ``lookup(stage, key)``."""
    if isinstance(value, dict):
        return {k: substitute(v, lookup) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, lookup) for v in value]
    if isinstance(value, str):
        whole = REF.fullmatch(value)
        if whole:
            return lookup(whole.group(1), whole.group(2))
        return REF.sub(lambda m: str(lookup(m.group(1), m.group(2))), value)
    return value


def references(value: Any) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    substitute(value, lambda s, k: found.add((s, k)) or "")
    return found


class PipelineConfig(StrictModel):
    """synthesize -> reward -> train -> gate -> evaluate -> deploy, each stage optional."""

    name: str = Field("pipeline", pattern=r"^[A-Za-z0-9][\w.-]*$", description="Run name (lineage file name)")
    output: str = Field("runs/pipeline", description="Root URI (local path or s3://) of every stage's output")
    ray: RayConfig = Field(default_factory=RayConfig, description="How to reach Ray; shared by every stage")
    synthesize: dict[str, Any] | None = Field(None, description="SynthesizeConfig without output/ray")
    reward: dict[str, Any] | None = Field(None, description="RewardConfig without output/ray")
    train: dict[str, Any] | None = Field(None, description="TrainConfig without output/ray")
    gate: dict[str, Any] | None = Field(
        None, description="EvaluateConfig (dev split) whose promotion rule decides whether to deploy")
    evaluate: dict[str, Any] | None = Field(None, description="EvaluateConfig for the final report (test split)")
    deploy: dict[str, Any] | None = Field(None, description="ServeConfig without output/ray: serves the new model")
    reject_exit_code: int = Field(
        3, ge=0, le=255, description="Exit code when the gate rejects the new model. 3 (default) lets scripts tell "
                                     "it apart; a scheduled run sets 0, so its RayJob succeeds and the decision "
                                     "stays in the lineage record instead of triggering retries")
    lease_ttl_s: int | None = Field(
        None, gt=0, description="Take the output root's run lease (workflows.pipeline.lease) for at most this many "
                                "seconds, refusing to start while another run holds it; null: no lease")
    deploy_sample: list[str] = Field(
        default_factory=lambda: ["A man is playing a guitar.", "Ein Mann spielt Gitarre."],
        description="Sentences embedded through the deployed HTTP endpoint as a smoke check")

    def sections(self) -> dict[str, dict[str, Any]]:
        return {s: getattr(self, s) for s in STAGES if getattr(self, s) is not None}

    @model_validator(mode="after")
    def _check_stages(self) -> PipelineConfig:
        sections = self.sections()
        if not sections:
            raise ValueError("no stage configured; set at least one of " + ", ".join(STAGES))
        for stage, section in sections.items():
            for owned in ("output", "ray"):
                if owned in section:
                    raise ValueError(f"{stage}.{owned}: set by the pipeline (top-level `{owned}`); remove it here")
            for ref_stage, _key in references(section):
                if ref_stage not in sections or STAGES.index(ref_stage) >= STAGES.index(stage):
                    earlier = [s for s in sections if STAGES.index(s) < STAGES.index(stage)]
                    raise ValueError(f"{stage}: reference ${{{ref_stage}...}} must name an earlier configured "
                                     f"stage ({', '.join(earlier) or 'none'})")
            self.build_stage(stage, lambda s, k: f"/pending/{s}/{k}", output=f"/pending/{stage}")
        return self

    def build_stage(self, stage: str, lookup: Callable[[str, str], Any], output: str) -> StrictModel:
        """The stage's full config: references resolved, output and ray set by the pipeline."""
        cls = stage_config_class(stage)
        data = {**substitute(getattr(self, stage), lookup), "output": output,
                "ray": self.ray.model_dump(mode="json")}
        if stage == "deploy":
            data.setdefault("serve", {}).setdefault("blocking", False)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            text = format_validation_error(cls, e).replace("\n  ", f"\n  {stage}.")
            raise ValueError(text) from None
