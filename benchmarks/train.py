"""Training throughput: Ray Train with N CPU workers vs one process, same model, data, batch and steps.

    flock /tmp/embedforge-heavy.lock .venv/bin/python -m benchmarks.train --steps 30 --batch 32

All sides train all-MiniLM-L6-v2 with the same sentence-transformers loss on STS-B train rows
with the same global batch, one process having as many torch threads as the Ray run has workers:

* **sentence-transformers trainer** (the named baseline): ``SentenceTransformerTrainer`` with
  CoSENT (``benchmarks.st_reference``; needs the ``bench`` extra, i.e. ``datasets``);
* **same loop, one process**: the exact step the Ray Train loop runs (preprocess, loss,
  backward, AdamW), without Ray, on the same rows in the same order;
* **Ray Train**: ``run_train`` with ``num_workers`` gloo workers of one CPU each.

Throughput is measured on steady-state steps: the first ``--warmup`` steps and start-up are
excluded on every side. Prints samples/s of each and the ratios of Ray Train to both baselines.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def config_for(args, output: str):
    from embedforge.config import build_config
    from workflows.train.config import TrainConfig

    objective = {"kind": "cosent"} if args.objective == "cosent" else {"kind": "mnrl", "num_negatives": 0}
    dataset = ({"source": "stsb", "split": "train"} if args.objective == "cosent"
               else {"source": "sick", "split": "train", "kind": "nli_triplets"})
    per_worker = args.batch // args.workers
    return build_config(TrainConfig, {
        "model": {"base": args.model},
        "datasets": [{"dataset": dataset, "objective": objective}],
        "train": {"max_steps": args.steps, "batch_size": per_worker, "log_every_n_steps": args.warmup,
                  "warmup_ratio": 0.0},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": 1},
        "dev": {"dataset": None}, "checkpoint": {"every_n_steps": 10_000, "metric": "train_loss", "mode": "min",
                                                  "keep_best_k": 1},
        "output": output, "run_name": "bench", "ray": {"num_cpus": max(4, args.workers + 2)},
    })


def single_process(config, threads: int, warmup: int) -> float:
    """Samples/s of the same steps in one process (global batch, ``threads`` torch threads)."""
    import torch

    from embedforge.models import resolve_model
    from workflows.train.loop import build_model, make_batch
    from workflows.train.losses import build_loss
    from workflows.train.mixture import load_mixture, schedule_for

    torch.set_num_threads(threads)
    mixture = load_mixture(config)
    one = schedule_for(config, [d.rows for d in mixture])
    model = build_model(resolve_model(config.model.base), config.model)
    model.train()
    objective = config.datasets[0].objective
    loss_fn = build_loss(objective, model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay, fused=True)
    t0 = None
    for step, (d, count) in enumerate(one.plan(0, config.train.max_steps)):
        if step == warmup:
            t0 = time.perf_counter()
        rows = [r for rank in range(one.world_size) for r in one.rows(d, count, rank)]
        features, labels = make_batch(model, objective, mixture[d].table, rows, torch.device("cpu"))
        loss = loss_fn(features, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    steps = config.train.max_steps - warmup
    return steps * one.global_batch / (time.perf_counter() - t0)


def ray_train(config) -> float:
    """Samples/s the Ray Train workers reported over the steps after the first window."""
    import json

    from embedforge import storage
    from workflows.train.run import run_train

    run_train(config)
    history = json.loads(storage.read_bytes(storage.join(config.output, "history.json")))
    windows = history[1:]
    steps = [h["step"] for h in history]
    spans = [b - a for a, b in zip(steps, steps[1:])]
    total_time = sum(span * config.train.batch_size * config.scaling.num_workers / h["samples_per_s"]
                     for span, h in zip(spans, windows))
    sync = sum(span * h["sync_share"] for span, h in zip(spans, windows)) / sum(spans)
    print(f"Ray Train: gradient all-reduce took {sync:.0%} of the steady-state step time (rank 0)")
    return sum(spans) * config.train.batch_size * config.scaling.num_workers / total_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--objective", choices=["cosent", "mnrl"], default="cosent")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing (and report window)")
    parser.add_argument("--batch", type=int, default=32, help="global batch (split across the Ray workers)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ef-bench-train-") as tmp:
        config = config_for(args, os.path.join(tmp, "run"))
        st = None
        if args.objective == "cosent":
            from benchmarks.st_reference import st_trainer_samples_per_s

            st = st_trainer_samples_per_s(args.model, batch=args.batch, steps=args.steps, warmup=args.warmup,
                                          lr=config.train.lr, threads=args.workers, output=os.path.join(tmp, "st"))
            print(f"sentence-transformers trainer ({args.workers} threads): {st:.1f} samples/s")
        base = single_process(config, threads=args.workers, warmup=args.warmup)
        print(f"same loop, one process ({args.workers} threads): {base:.1f} samples/s")
        ray_sps = ray_train(config)
        print(f"Ray Train ({args.workers} workers x 1 CPU): {ray_sps:.1f} samples/s")
    what = f"({args.steps} steps, global batch {args.batch}, {args.objective}, {args.model})"
    if st is not None:
        print(f"ratio Ray Train / sentence-transformers trainer: {ray_sps / st:.2f}x {what}")
    print(f"ratio Ray Train / same loop in one process: {ray_sps / base:.2f}x {what}")


if __name__ == "__main__":
    main()
