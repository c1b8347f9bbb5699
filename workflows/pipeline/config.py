"""The main job's config: the stages of one run, wired by ``${stage.key}`` references.

Each stage section holds that stage's own config (SynthesizeConfig, RewardConfig, TrainConfig,
EvaluateConfig for the gate and for the final report, ServeConfig for deploy) without
``output`` and ``ray``: the pipeline owns both. A string ``${train.model}`` anywhere in a
section is replaced by the ``model`` value of the train stage's summary, ``${synthesize.output}``
by that stage's output URI, and so on; a reference may only point at an earlier stage.

Validation builds every stage config up front (references replaced by placeholders), so a bad
pipeline config exits with code 2 before any cluster work, naming ``<stage>.<field>``. A reference
must name a field of the referenced stage's result model (:mod:`workflows.pipeline.stages`), e.g.
``output`` of any stage or ``model`` of train; anything else is refused at load.

:meth:`PipelineConfig.plan` gives every stage's key and output before anything runs: the key hashes
the stage's content hash with each reference replaced by the referenced stage's key, so a change
upstream changes every key downstream, and ``--dry-run`` prints the same keys the run will use.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from embedforge import storage
from embedforge.config import StrictModel, format_validation_error
from embedforge.errors import ConfigError, EmbedforgeError
from embedforge.runtime import RayConfig
from workflows.pipeline.snapshot import input_snapshot
from workflows.pipeline.stages import PIPELINE_STAGES, Stage

# Stage order is the DAG: each stage may reference the outputs of the stages before it.
STAGES = ("synthesize", "reward", "train", "gate", "evaluate", "deploy")
REF = re.compile(r"\$\{(\w+)\.(\w+)\}")


def stage_config_class(stage: str) -> type[StrictModel]:
    """The config model of a pipeline section (imported lazily: stage packages pull in heavy code)."""
    return PIPELINE_STAGES[stage].config_class


def stage_key(stage: str, resolved: dict[str, Any], content_hash: str | None = None,
              inputs: dict[str, str] | None = None) -> str:
    """Key of a stage's output: its content hash (or, without one, its config less output/ray), plus
    the fingerprints of the datasets it reads (:func:`workflows.pipeline.snapshot.input_snapshot`)."""
    data = content_hash or {k: v for k, v in resolved.items() if k not in ("output", "ray")}
    blob = json.dumps({"stage": stage, "config": data, "inputs": inputs or {}}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _scalar(annotation: Any) -> bool:
    """Whether a result field holds a value a reference can put into a config (str / number)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    return all(a in (str, int, float, type(None)) for a in args)


def ref_placeholder(output: str, field: str) -> str:
    """Stands for ``${stage.field}`` before the stage ran: the stage's output URI for ``output``, a path
    below it for other fields (so URI-typed fields accept it and the data snapshot skips it)."""
    return output if field == "output" else storage.join(output, f"@{field}")


@dataclass(frozen=True)
class PlannedStage:
    """A section of the pipeline before it runs: which stage, its key, where it writes."""

    section: str
    stage: Stage
    key: str
    output: str
    config: StrictModel            # references replaced by placeholders (ref_placeholder)
    inputs: dict[str, str]         # the data snapshot in the key


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
            for ref_stage, key in sorted(references(section)):
                if ref_stage not in sections or STAGES.index(ref_stage) >= STAGES.index(stage):
                    earlier = [s for s in sections if STAGES.index(s) < STAGES.index(stage)]
                    raise ValueError(f"{stage}: reference ${{{ref_stage}...}} must name an earlier configured "
                                     f"stage ({', '.join(earlier) or 'none'})")
                fields = PIPELINE_STAGES[ref_stage].result_model.model_fields
                usable = sorted(f for f, info in fields.items() if _scalar(info.annotation))
                if key not in usable:
                    raise ValueError(f"{stage}: reference ${{{ref_stage}.{key}}}: the {ref_stage} stage's result has "
                                     f"no field {key!r} to reference; it has {', '.join(usable)}")
            self.build_stage(stage, lambda s, k: f"/pending/{s}/{k}", output=f"/pending/{stage}")
        return self

    def plan(self, snapshot: bool = True) -> list[PlannedStage]:
        """Key and output of every committed stage (deploy is not one), computed without running.

        ``snapshot=False`` leaves the data snapshot out of the keys (for a look at a config whose
        data cannot be read from here); runs always include it.
        """
        planned: dict[str, PlannedStage] = {}
        for section in self.sections():
            stage = PIPELINE_STAGES[section]
            if not stage.committed:
                continue
            probe = self.build_stage(section, lambda s, k: ref_placeholder(planned[s].output, k), output="/pending")
            dumped = probe.model_dump(mode="json")
            inputs = input_snapshot(dumped, self.output) if snapshot else {}
            key = stage_key(section, dumped, stage.content_hash(probe), inputs)
            planned[section] = PlannedStage(section, stage, key, storage.join(self.output, section, key), probe, inputs)
        return list(planned.values())

    def check(self) -> None:
        """Every stage's checks beyond its config model (API-key variables, few-shot data), before Ray."""
        for section in self.sections():
            stage = PIPELINE_STAGES[section]
            try:
                stage.check(self.build_stage(section, lambda s, k: f"/pending/{s}/{k}", output=f"/pending/{section}"))
            except ConfigError as e:
                raise ConfigError(f"{section}.{e}") from None

    def describe(self) -> str:
        """What ``--dry-run`` prints: this config, then every resolved stage config with its key and output.

        One YAML document: the pipeline config, and under ``resolved_stages`` (not a config key) each
        stage's key, output and full config with references resolved where they are known before the
        run (``${x.output}``); the others stay ``${stage.field}``.
        """
        note = ""
        try:
            plans = {p.section: p for p in self.plan()}
        except (EmbedforgeError, OSError) as e:
            plans = {p.section: p for p in self.plan(snapshot=False)}
            note = f"# keys leave out the data snapshot, which cannot be read from here ({e})\n"
        stages: dict[str, Any] = {}
        for section in self.sections():
            if section in plans:
                p = plans[section]
                text = json.dumps(p.config.model_dump(mode="json") | {"output": p.output})
                for ref_stage, ref_key in references(getattr(self, section)):
                    if ref_key != "output":  # known once that stage has run
                        text = text.replace(ref_placeholder(plans[ref_stage].output, ref_key),
                                            f"${{{ref_stage}.{ref_key}}}")
                stages[section] = {"stage": p.stage.name, "key": p.key, "output": p.output,
                                   "inputs": p.inputs, "config": json.loads(text)}
            else:
                cfg = self.build_stage(section, lambda s, k: f"${{{s}.{k}}}", output=storage.join(self.output, section))
                stages[section] = {"stage": PIPELINE_STAGES[section].name, "key": None,
                                   "config": cfg.model_dump(mode="json")}
        return (f"# {type(self).__name__} (hash {self.config_hash()})\n{self.to_yaml()}{note}"
                "# resolved_stages: what each stage runs with, its key and output (printed, not a config key)\n"
                + yaml.safe_dump({"resolved_stages": stages}, sort_keys=False))

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
