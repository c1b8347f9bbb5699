"""Which stages the next pipeline run would execute and which it would reuse:
``python -m jobs.plan --config configs/nightly.yaml [--set a.b=c]``.

Reads the pipeline config (the same file ``jobs.pipeline`` runs), fingerprints the datasets each
stage reads and looks up committed outputs under ``output``; starts no Ray and writes nothing.
Exit codes: 0 printed, 2 bad config, 1 any other error (e.g. a missing input).
"""

from __future__ import annotations

import sys

from embedforge.config import run_job
from workflows.pipeline.config import PipelineConfig


def plan(config: PipelineConfig) -> int:
    from workflows.pipeline.plan import format_plan, plan_pipeline

    print(format_plan(config, plan_pipeline(config)))
    return 0


def main(argv=None) -> int:
    return run_job(PipelineConfig, plan, argv)


if __name__ == "__main__":
    sys.exit(main())
