"""``plan_pipeline(config)``: which stages a run would execute and which it would reuse, without
running anything or starting Ray.

Every stage's key is known before anything runs (:meth:`PipelineConfig.plan`: content hash with
references replaced by upstream keys, plus the data snapshot), exactly as
:func:`workflows.pipeline.run.run_pipeline` uses it. A stage whose output under that key is
committed by the committed-run rule (:mod:`embedforge.committed`) is reused; any other runs.
Deploy runs when the gate promotes.

``python -m jobs.plan --config configs/nightly.yaml`` prints the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from embedforge import storage
from embedforge.committed import read_record
from workflows.pipeline.config import PipelineConfig

RUN, REUSE, AFTER = "run", "reuse", "run (after an upstream stage)"


@dataclass
class StagePlan:
    stage: str
    action: str                     # RUN, REUSE or AFTER
    key: str | None = None
    output: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    reason: str = ""


def _committed(output: str) -> bool:
    record = read_record(output)
    return storage.is_committed(output) and record is not None and record.get("status") == "committed"


def plan_pipeline(config: PipelineConfig) -> list[StagePlan]:
    planned = {p.section: p for p in config.plan()}
    plans: list[StagePlan] = []
    for section in config.sections():
        p = planned.get(section)
        if p is None:
            plans.append(StagePlan(section, RUN, reason="serves the new model if the gate promotes it"))
        elif _committed(p.output):
            plans.append(StagePlan(section, REUSE, p.key, p.output, p.inputs, "committed output with this key"))
        else:
            reason = "no committed output with this key (new config, new data or upstream change)"
            plans.append(StagePlan(section, RUN, p.key, p.output, p.inputs, reason))
    return plans


def format_plan(config: PipelineConfig, plans: list[StagePlan]) -> str:
    lines = [f"# plan for {config.name} -> {config.output}"]
    for p in plans:
        lines.append(f"{p.stage:12s} {p.action:30s} key={p.key or '-'}  {p.reason}")
        for name, digest in p.inputs.items():
            lines.append(f"{'':12s}   input {name}: {digest[:16]}")
    return "\n".join(lines)
