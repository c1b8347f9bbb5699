"""The reference trainer: sentence-transformers' own ``SentenceTransformerTrainer`` in one process.

    flock /tmp/embedforge-heavy.lock .venv/bin/python -m benchmarks.st_reference \\
        --epochs 1 --batch 16 --output runs/st-reference-cosent

Trains all-MiniLM-L6-v2 with CoSENT on STS-B train (sentence-transformers'
``training_stsbenchmark`` recipe: batch 16, lr 2e-5, 10% warmup), checkpoints scored on STS-B
dev, and saves the final model; ``benchmarks.train_quality`` then scores it on test beside the
Ray Train model, so a quality gap between the two is the loop's and not the recipe's.
``--max-steps`` with ``--warmup`` measures steady-state samples/s instead (``benchmarks.train``
uses :func:`st_trainer_samples_per_s` as its baseline). Needs the ``bench`` extra (``datasets``).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def stsb_dataset(split: str):
    """STS-B rows as a ``datasets.Dataset`` (sentence1, sentence2, score) from the shared data."""
    try:
        from datasets import Dataset
    except ImportError as e:
        raise SystemExit("the sentence-transformers trainer needs `datasets`: pip install -e '.[bench]'") from e
    from embedforge.data import DatasetSpec, load_dataset

    table = load_dataset(DatasetSpec(source="stsb", split=split))
    return Dataset.from_dict({c: table[c].to_list() for c in ("sentence1", "sentence2", "score")})


def build_trainer(model_name: str, output: str, *, batch: int, lr: float, epochs: float = 1.0,
                  max_steps: int = -1, seed: int = 0, threads: int = 2, dev: bool = True, callbacks=()):
    import torch
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    from embedforge.models import resolve_model

    torch.set_num_threads(threads)
    model = SentenceTransformer(resolve_model(model_name), device="cpu")
    evaluator = None
    if dev:
        d = stsb_dataset("dev")
        evaluator = EmbeddingSimilarityEvaluator(d["sentence1"], d["sentence2"], d["score"],
                                                 main_similarity="cosine", name="sts-dev")
    args = SentenceTransformerTrainingArguments(
        output_dir=output, per_device_train_batch_size=batch, learning_rate=lr, warmup_steps=0.1,
        num_train_epochs=epochs, max_steps=max_steps, seed=seed, use_cpu=True, report_to="none",
        eval_strategy="epoch" if dev else "no", save_strategy="no", logging_steps=50,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=stsb_dataset("train"),
                                      loss=CoSENTLoss(model), evaluator=evaluator, callbacks=list(callbacks))


def steady_clock(warmup: int, steps: int):
    """A trainer callback that times steps ``warmup``..``steps``, and ``samples_per_s(batch)`` to read it."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[str, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.marks["start"] = time.perf_counter()
            if state.global_step == steps:
                self.marks["end"] = time.perf_counter()

        def samples_per_s(self, batch: int) -> float:
            return (steps - warmup) * batch / (self.marks["end"] - self.marks["start"])

    return Clock()


def st_trainer_samples_per_s(model_name: str, *, batch: int, steps: int, warmup: int, lr: float,
                             threads: int, output: str) -> float:
    """Steady-state samples/s of the sentence-transformers trainer (steps after ``warmup``)."""
    clock = steady_clock(warmup, steps)
    trainer = build_trainer(model_name, output, batch=batch, lr=lr, max_steps=steps, threads=threads,
                            dev=False, callbacks=[clock])
    trainer.train()
    return clock.samples_per_s(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="runs/st-reference-cosent")
    args = parser.parse_args()
    trainer = build_trainer(args.model, args.output, batch=args.batch, lr=args.lr, epochs=args.epochs,
                            seed=args.seed, threads=args.threads)
    t0 = time.perf_counter()
    trainer.train()
    trainer.model.save(os.path.join(args.output, "model"))
    key = "eval_sts-dev_spearman_cosine"
    dev = [round(100 * h[key], 2) for h in trainer.state.log_history if key in h]
    print(f"trained {trainer.state.global_step} steps in {time.perf_counter() - t0:.0f} s; "
          f"dev Spearman per epoch: {dev}; model: {args.output}/model")


if __name__ == "__main__":
    main()
