"""Reward benchmark: Ray Data scoring vs direct vLLM, teacher agreement, cross-encoder Spearman.

    flock /tmp/embedforge-heavy.lock .venv/bin/python -m benchmarks.reward --queries 48 --sts 300

1. Throughput: the same (question, candidate) pairs (XQuAD train, mined hard negatives) scored
   (a) directly with one in-process LLMEngine and (b) through the pipeline's Ray Data stage (one
   RewardScorer actor). Both timings include one engine start; the ratio is (b) / (a) in pairs/s.
2. Teacher agreement: the share of questions whose gold paragraph gets the highest reward.
3. Spearman of the LLM cross-encoder against gold on STS-B dev (never test).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=48, help="XQuAD train questions (en)")
    parser.add_argument("--top-k", type=int, default=3, help="hard negatives per question")
    parser.add_argument("--sts", type=int, default=300, help="STS-B dev pairs for the Spearman")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import polars as pl

    from actors.reward_scorer import RewardScorer
    from embedforge import storage
    from embedforge.config import build_config
    from embedforge.data import DatasetSpec, load_dataset
    from embedforge.runtime import init_ray
    from workflows.reward.config import RewardConfig
    from workflows.reward.mining import mine_hard_negatives
    from workflows.reward.pipeline import _SHARD, doc_id_of, feedback_metrics, read_sub, score_shards
    from workflows.reward.scoring import spearman

    out = tempfile.mkdtemp(prefix="reward-bench-")
    cfg = build_config(RewardConfig, {
        "output": out, "ray": {"num_cpus": 4, "include_dashboard": False},
        "mining": {"top_k": args.top_k},
        "llm_feedback": {"data": {"source": "xquad", "split": "train", "lang": "en", "limit": args.queries},
                         "batch_size": args.batch_size, "shard_queries": 10_000},
        "cross_encoder": {"batch_size": args.batch_size},
    })
    init_ray(cfg.ray)
    qa = load_dataset(cfg.llm_feedback.data).with_columns(
        pl.col("context").map_elements(doc_id_of, return_dtype=pl.String).alias("doc_id"))
    corpus = qa.select("doc_id", pl.col("context").alias("text")).unique("doc_id", maintain_order=True)
    negatives, _ = mine_hard_negatives(qa.select("qid", pl.col("question").alias("text")), corpus,
                                       {q: {d} for q, d in qa.select("qid", "doc_id").iter_rows()}, cfg.mining)
    cands = pl.concat([qa.select("qid", "doc_id").with_columns(pl.lit(0, pl.Int32).alias("rank"),
                                                               pl.lit(True).alias("is_positive")),
                       negatives.select("qid", "doc_id", "rank").with_columns(pl.lit(False).alias("is_positive"))])
    pairs = (cands.join(qa.select("qid", "question", "answer"), on="qid")
             .join(corpus.rename({"text": "passage"}), on="doc_id")
             .with_columns(pl.col("question").alias("query"), pl.lit("feedback-00000").alias(_SHARD)))
    n = pairs.height
    print(f"pairs: {n} ({qa.height} questions x (gold + {args.top_k} mined), {corpus.height} paragraphs)")

    # (a) direct: one engine in this process, batches of batch_size
    t0 = time.perf_counter()
    scorer = RewardScorer(cfg.scorer.engine, task="feedback", feedback=cfg.llm_feedback)
    t1 = time.perf_counter()
    bs = args.batch_size
    for i in range(0, n, bs):
        part = pairs.slice(i, bs)
        scorer.score_feedback(part["query"].to_list(), part["passage"].to_list(), part["answer"].to_list())
    t2 = time.perf_counter()
    direct_e2e, direct_score = n / (t2 - t0), n / (t2 - t1)
    print(f"direct vLLM: {direct_e2e:.2f} pairs/s incl. engine start ({t1 - t0:.1f}s), {direct_score:.2f} scoring only")

    # cross-encoder Spearman on STS-B dev with the same engine
    sts = load_dataset(DatasetSpec(source="stsb", split="dev", limit=args.sts))
    ce = RewardScorer(scorer.engine, task="cross_encoder", cross_encoder=cfg.cross_encoder)
    t3 = time.perf_counter()
    teacher, mass = [], []
    for i in range(0, sts.height, bs):
        part = sts.slice(i, bs)
        res = ce.score_pairs(part["sentence1"].to_list(), part["sentence2"].to_list())
        teacher += res["teacher_score"].tolist()
        mass += res["score_mass"].tolist()
    t4 = time.perf_counter()
    ok = [i for i, s in enumerate(teacher) if s == s]
    rho = spearman([sts["score"][i] for i in ok], [teacher[i] for i in ok])
    del ce, scorer
    gc.collect()

    # (b) the pipeline's Ray Data stage (one actor, its own engine)
    writer = storage.ShardedWriter(out)
    t5 = time.perf_counter()
    score_shards(pairs, "feedback", cfg, writer, "feedback", "llm_feedback")
    t6 = time.perf_counter()
    pipe = n / (t6 - t5)
    metrics = feedback_metrics(read_sub(writer, "feedback"))
    print(f"Ray Data pipeline: {pipe:.2f} pairs/s incl. actor + engine start")
    print(f"ratio pipeline / direct (both incl. one engine start): {pipe / direct_e2e:.2f}x (goal >= 0.9x)")
    print(f"ratio pipeline / direct scoring only: {pipe / direct_score:.2f}x")
    print(f"teacher agreement: gold paragraph ranked first for {metrics['gold_top1']:.1%} of "
          f"{metrics['queries']} questions (chance {1 / (args.top_k + 1):.1%}); mean reward gold "
          f"{metrics['mean_reward_gold']:.3f}, mined negatives {metrics['mean_reward_negative']:.3f}")
    print(f"LLM cross-encoder on STS-B dev ({len(ok)} of {sts.height} pairs scored, {len(ok) / (t4 - t3):.1f} "
          f"pairs/s): Spearman {rho:.4f}, mean score-token mass {sum(mass[i] for i in ok) / max(1, len(ok)):.3f}")


if __name__ == "__main__":
    main()
