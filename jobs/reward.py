"""Rewards and teacher labels: ``python -m jobs.reward --config configs/reward.yaml [--set a.b=c] [--dry-run]``.

Runs as a Ray job too: ``ray job submit --working-dir . -- python -m jobs.reward --config configs/reward.yaml``.
"""

from __future__ import annotations

import json
import sys

from embedforge.config import run_job
from workflows.pipeline.stages import REWARD
from workflows.reward.config import RewardConfig


def reward(config: RewardConfig) -> int:
    done = REWARD.run(config)
    summary = done.result.model_dump()
    shown = {k: v for k, v in summary.items() if k != "manifest"}
    print(json.dumps(shown, indent=2, default=str))
    print(f"output: {summary['output']} (committed{'; skipped: committed by this config' if done.status == 'skipped' else ''})")
    for path in summary.get("report") or []:
        print(f"report: {path}")
    return 0


def main(argv=None) -> int:
    return run_job(RewardConfig, reward, argv, check=REWARD.check)


if __name__ == "__main__":
    sys.exit(main())
