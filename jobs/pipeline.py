"""The main job: ``python -m jobs.pipeline --config configs/quickstart.yaml``.

Runs synthesize -> reward -> train -> gate -> evaluate -> deploy (each optional) as one DAG;
a rerun skips stages whose outputs are complete. Through Ray Jobs:
``ray job submit --working-dir . -- python -m jobs.pipeline --config configs/pipeline.yaml``.

Exit codes: 0 done (model promoted, or no gate); ``reject_exit_code`` (3 unless set; the nightly
config sets 0) the gate rejected the new model (nothing new was deployed); 2 bad config; 1 any
other error, also when another run holds the output root's lease (``lease_ttl_s``).
"""

from __future__ import annotations

import sys

from embedforge import storage
from embedforge.config import run_job
from workflows.pipeline.config import PipelineConfig


def _row(label: str, value: float | None, base: float | None) -> str:
    if value is None:
        return f"  {label:30s}      -"
    if base is None:
        return f"  {label:30s} {value:6.2f}"
    return f"  {label:30s} {base:6.2f} -> {value:6.2f} ({value - base:+.2f})"


def pipeline(config: PipelineConfig) -> int:
    from contextlib import nullcontext

    from workflows.pipeline.lease import RunLease
    from workflows.pipeline.run import run_pipeline

    lease = RunLease(config.output, config.lease_ttl_s, config.name) if config.lease_ttl_s else nullcontext()
    with lease:
        result = run_pipeline(config)
    r = result["results"]
    print("\n=== embedforge pipeline:", config.name, "===")
    for stage, status in result["stages"].items():
        print(f"  {stage:12s} {status}")
    if "synthesize" in r:
        counts = (r["synthesize"].manifest or {}).get("counts", {})
        if counts:
            print(f"synthesized: {counts}")
        if r["synthesize"].report:
            print(f"synthesize report: {r['synthesize'].report}")
    for name in ("gate", "evaluate"):
        if name in r:
            ev = r[name]
            base = storage.read_json(ev.report).get("baseline") or {}
            print(f"\n{name} ({ev.split} split): baseline {base.get('model', '-')} -> candidate {ev.model}")
            base_metrics = (base.get("metrics") or {})
            for key, value in ev.metrics.items():
                print(_row(key, value, base_metrics.get(key)))
            for task, value in ev.tasks.items():
                print(_row(f"task {task}", value, (base.get("tasks") or {}).get(task)))
            print(f"  report: {ev.report}")
            for p in ev.plots:
                print(f"  plot:   {p}")
    if "train" in r:
        print(f"\nmodel: {r['train'].model}")
    gate = r["gate"].gate if "gate" in r else None
    if gate:
        print(f"gate: {gate['decision'].upper()}" + "".join(f"\n  - {x}" for x in gate["reasons"]))
    if result["deploy"]:
        d = result["deploy"]
        print(f"served at {d['embeddings']} ; sample: {d['sample']}")
    print(f"lineage: {result['lineage']}")
    return 0 if result["promote"] else config.reject_exit_code


def main(argv=None) -> int:
    return run_job(PipelineConfig, pipeline, argv, check=PipelineConfig.check, describe=PipelineConfig.describe)


if __name__ == "__main__":
    sys.exit(main())
