"""Promotion gate: candidate report + baseline report + rule -> promote or reject, with reasons.

Pure (no I/O). Both reports are the ``report.json`` structure of :mod:`workflows.evaluate.report`
(``split``, ``tasks`` = task means, ``metrics`` = main metric per dataset, ``mean``), all in
metric points (x 100). The rule rejects when

* the reports are not comparable (different split, or a task/dataset of the baseline is missing
  from the candidate);
* any task mean falls by more than ``max_drop`` (or its ``max_drop_per_task`` override);
* the main metric rises by less than ``min_rise``.

Example::

    >>> decide({"split": "test", "tasks": {"sts": 80.0}, "metrics": {}, "mean": 80.0},
    ...        {"split": "test", "tasks": {"sts": 79.0}, "metrics": {}, "mean": 79.0},
    ...        GateRule(min_rise=0.5)).decision
    'promote'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from embedforge.errors import InputError
from workflows.evaluate.config import GateRule

PROMOTE, REJECT = "promote", "reject"


@dataclass(frozen=True)
class GateDecision:
    decision: Literal["promote", "reject"]
    reasons: list[str]
    main_metric: str
    candidate_main: float | None
    baseline_main: float | None
    deltas: dict[str, float] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def main_value(report: dict[str, Any], name: str) -> float | None:
    """The value of ``name`` in a report: 'mean', a task name, or a dataset metric key."""
    if name == "mean":
        return report.get("mean")
    if name in report.get("tasks", {}):
        return report["tasks"][name]
    return report.get("metrics", {}).get(name)


def decide(candidate: dict[str, Any], baseline: dict[str, Any], rule: GateRule) -> GateDecision:
    for what, rep in (("candidate", candidate), ("baseline", baseline)):
        missing = [k for k in ("split", "tasks", "metrics", "mean") if k not in rep]
        if missing:
            raise InputError(f"{what} report lacks {missing}; pass a report.json written by the evaluate job")
    reasons: list[str] = []
    if candidate["split"] != baseline["split"]:
        reasons.append(f"not comparable: candidate evaluated on split {candidate['split']!r}, "
                       f"baseline on {baseline['split']!r}")
    missing_tasks = sorted(set(baseline["tasks"]) - set(candidate["tasks"]))
    missing_sets = sorted(set(baseline["metrics"]) - set(candidate["metrics"]))
    if missing_tasks or missing_sets:
        reasons.append(f"not comparable: candidate lacks tasks {missing_tasks} / datasets {missing_sets} "
                       "that the baseline has")
    deltas = {}
    for task in sorted(set(baseline["tasks"]) & set(candidate["tasks"])):
        delta = candidate["tasks"][task] - baseline["tasks"][task]
        deltas[task] = round(delta, 4)
        limit = rule.max_drop_per_task.get(task, rule.max_drop)
        if delta < -limit:
            reasons.append(f"task {task} dropped {-delta:.2f} points ({baseline['tasks'][task]:.2f} -> "
                           f"{candidate['tasks'][task]:.2f}); allowed drop {limit:g}")
    cand_main, base_main = main_value(candidate, rule.main_metric), main_value(baseline, rule.main_metric)
    if cand_main is None or base_main is None:
        reasons.append(f"main metric {rule.main_metric!r} missing from the "
                       f"{'candidate' if cand_main is None else 'baseline'} report")
    else:
        rise = cand_main - base_main
        if rise < rule.min_rise:
            reasons.append(f"main metric {rule.main_metric} rose {rise:+.2f} points ({base_main:.2f} -> "
                           f"{cand_main:.2f}); required at least {rule.min_rise:+g}")
    if not reasons:
        reasons.append(f"no task dropped more than allowed; main metric {rule.main_metric} "
                       f"{base_main:.2f} -> {cand_main:.2f} (required rise {rule.min_rise:+g})")
        decision = PROMOTE
    else:
        decision = REJECT
    return GateDecision(decision, reasons, rule.main_metric, cand_main, base_main, deltas)
