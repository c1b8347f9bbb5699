"""``plan_pipeline(config)``: which stages a run would execute and which it would reuse, without
running anything or starting Ray.

Each stage's key is computed as :func:`workflows.pipeline.run.run_pipeline` computes it (resolved
config + data snapshot). A stage whose key has a committed output is reused, and its recorded
summary resolves the references of later stages. A stage that would run has a known output URI
(its key) but no summary yet: a later stage that needs more than its output URI (``${train.model}``)
cannot be keyed now and would run after it. Deploy runs when the gate promotes.

``python -m jobs.plan --config configs/nightly.yaml`` prints the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embedforge import storage
from embedforge.errors import EmbedforgeError
from workflows.pipeline.config import PipelineConfig
from workflows.pipeline.run import _is_done, stage_key
from workflows.pipeline.snapshot import input_snapshot

RUN, REUSE, AFTER = "run", "reuse", "run (after an upstream stage)"


class _Pending(EmbedforgeError):
    """A reference to a summary value that only exists once an upstream stage has run."""


@dataclass
class StagePlan:
    stage: str
    action: str                     # RUN, REUSE or AFTER
    key: str | None = None
    output: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    reason: str = ""


def plan_pipeline(config: PipelineConfig) -> list[StagePlan]:
    root = config.output
    summaries: dict[str, dict[str, Any]] = {}
    pending: dict[str, str] = {}          # stage that would run -> its output URI

    def lookup(stage: str, key: str) -> Any:
        if stage in pending:
            if key == "output":
                return pending[stage]
            raise _Pending(f"${{{stage}.{key}}} is known once {stage} has run")
        if stage not in summaries:
            raise _Pending(f"${{{stage}.{key}}}: {stage} would run after an upstream stage")
        return summaries[stage].get(key)

    plans: list[StagePlan] = []
    for stage in config.sections():
        if stage == "deploy":
            plans.append(StagePlan(stage, RUN, reason="serves the new model if the gate promotes it"))
            continue
        try:
            probe = config.build_stage(stage, lookup, output="/pending")
        except _Pending as e:
            plans.append(StagePlan(stage, AFTER, reason=str(e)))
            continue
        dumped = probe.model_dump(mode="json")
        inputs = input_snapshot(dumped, root)
        own_hash = probe.content_hash() if hasattr(probe, "content_hash") else None
        key = stage_key(stage, dumped, own_hash, inputs)
        output = storage.join(root, stage, key)
        record_uri = storage.join(root, "stages", f"{stage}-{key}.json")
        if _is_done(stage, record_uri, output):
            summaries[stage] = storage.read_json(record_uri)
            plans.append(StagePlan(stage, REUSE, key, output, inputs, "committed output with this key"))
        else:
            pending[stage] = output
            reason = "no committed output with this key (new config, new data or upstream change)"
            plans.append(StagePlan(stage, RUN, key, output, inputs, reason))
    return plans


def format_plan(config: PipelineConfig, plans: list[StagePlan]) -> str:
    lines = [f"# plan for {config.name} -> {config.output}"]
    for p in plans:
        lines.append(f"{p.stage:12s} {p.action:30s} key={p.key or '-'}  {p.reason}")
        for name, digest in p.inputs.items():
            lines.append(f"{'':12s}   input {name}: {digest[:16]}")
    return "\n".join(lines)
