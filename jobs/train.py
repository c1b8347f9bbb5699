"""Fine-tune a sentence embedder on Ray Train: ``python -m jobs.train --config configs/train.yaml``.

Also runs through ``ray job submit --working-dir . -- python -m jobs.train --config ...`` (Ray is
joined through ``RAY_ADDRESS``). Prints the exported model, dev metrics and the training curve.
"""

from __future__ import annotations

import json
import sys

from embedforge.config import run_job
from workflows.pipeline.stages import TRAIN
from workflows.train.config import TrainConfig


def train(config: TrainConfig) -> int:
    done = TRAIN.run(config)
    if done.status == "skipped":
        print(f"{config.output} is committed by this config; skipped (write to a new output to train again)")
    summary = done.result.model_dump()
    print(json.dumps({k: v for k, v in summary.items() if k != "manifest"}, indent=2, default=str))
    print(f"model: {summary['model']}\ncurve: {summary['curve']}")
    return 0


def main(argv=None) -> int:
    return run_job(TrainConfig, train, argv, check=TRAIN.check)


if __name__ == "__main__":
    sys.exit(main())
