"""Evaluate a sentence-transformers model: ``python -m jobs.evaluate --config configs/evaluate.yaml``.

Also through Ray Jobs: ``ray job submit --working-dir . -- .venv/bin/python -m jobs.evaluate --config ...``.

Exit codes: 0 done (and, when a gate is configured, the candidate is promoted); 3 the gate
rejected the candidate; 2 bad config; 1 any other error (missing model or data, storage, engine).
"""

from __future__ import annotations

import sys

from embedforge.config import run_job
from workflows.evaluate.config import EvaluateConfig
from workflows.pipeline.stages import EVALUATE

EXIT_REJECTED = 3


def _fmt(v):
    return "full" if v is None else v


def evaluate(config: EvaluateConfig) -> int:
    summary = EVALUATE.run(config).result.model_dump()
    print(f"model {summary['model']} ({summary['split']} split)")
    for key, value in summary["metrics"].items():
        print(f"  {key:32s} {value:7.2f}")
    for task, value in summary["tasks"].items():
        print(f"  task {task:27s} {value:7.2f}")
    print(f"  mean {'':27s} {summary['mean']:7.2f}")
    for cell in summary["grid"]:
        print(f"  grid layers={_fmt(cell['layers'])} dims={_fmt(cell['dims'])}: mean {cell['mean']:.2f}, "
              f"{cell['throughput']:.0f} sentences/s")
    if summary["baseline"]:
        print(f"baseline {summary['baseline']['model']}: mean {summary['baseline']['mean']:.2f}")
    print(f"report {summary['report']}")
    for p in summary["plots"]:
        print(f"plot   {p}")
    gate = summary["gate"]
    if gate:
        print(f"gate: {gate['decision'].upper()}")
        for reason in gate["reasons"]:
            print(f"  - {reason}")
        return 0 if gate["decision"] == "promote" else EXIT_REJECTED
    return 0


def main(argv=None) -> int:
    return run_job(EvaluateConfig, evaluate, argv, check=EVALUATE.check)


if __name__ == "__main__":
    sys.exit(main())
