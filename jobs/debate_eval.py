"""Debate evaluation: ``python -m jobs.debate_eval --config configs/debate_eval.yaml [--set a.b=c] [--dry-run]``.

CIPHER vs natural-language debate vs a single agent on GSM8K problems and seeded arithmetic (the dev
pool with ``--set data.split=dev``); prints the accuracy table, the paired tests and where the report and
plot were committed. With ``max_seconds`` it stops early; the same command continues where it stopped.
"""

from __future__ import annotations

import sys

from embedforge.config import run_job
from workflows.debate.config import DebateEvalConfig


def debate_eval(config: DebateEvalConfig) -> int:
    from embedforge import storage
    from workflows.debate.evaluate import run_debate_eval

    summary = run_debate_eval(config)
    print(summary["report"])
    if not summary["complete"]:
        print(f"output: {summary['output']} NOT complete ({summary['batches_done']}/{summary['batches_total']} "
              "batches); rerun the same command to continue")
        return 0
    print(f"output: {summary['output']} (committed)")
    for name in ("report.md", "accuracy.png", "summary.json", "results.parquet"):
        print(f"{name}: {storage.join(summary['output'], name)}")
    return 0


def main(argv=None) -> int:
    return run_job(DebateEvalConfig, debate_eval, argv)


if __name__ == "__main__":
    sys.exit(main())
