"""Mined hard negatives for MNRL: the reward stage's feedback rows -> ``anchor, positive, negative_1..n``.

The reward stage writes one row per (query, candidate): the gold passage (``is_positive``, rank 0)
and the passages its embedder mined (ranks 1..k by similarity, false negatives already guarded).
PEG and LLM-Embedder both train InfoNCE with several mined negatives per query beside the
in-batch ones; this pivot gives MNRL those columns (``negative`` when ``n == 1``, the NLI triplet
schema). Queries with fewer than ``n`` mined negatives are not trained on and are counted.
"""

from __future__ import annotations

import pyarrow as pa

FEEDBACK_NEGATIVE_COLUMNS = {"qid", "question", "passage", "rank", "is_positive"}


def feedback_negatives(table: pa.Table, n: int) -> tuple[pa.Table, int]:
    """One row per query: its gold passage and its ``n`` best-ranked mined negatives.

    Returns the table and the number of queries left out (no gold passage, or fewer than ``n`` negatives).
    """
    import polars as pl

    if n < 1:
        raise ValueError(f"feedback_negatives: need n >= 1 negatives per query, got {n}")
    df = pl.from_arrow(table).sort(["qid", "rank"])
    pos = df.filter(pl.col("is_positive")).group_by("qid", maintain_order=True).agg(
        pl.col("question").first(), pl.col("passage").first().alias("positive"))
    neg = df.filter(~pl.col("is_positive")).group_by("qid", maintain_order=True).agg(
        pl.col("passage").head(n).alias("negatives"))
    wide = pos.join(neg, on="qid", how="left")
    complete = wide.filter(pl.col("negatives").list.len() >= n)
    out = {"anchor": complete["question"].to_list(), "positive": complete["positive"].to_list()}
    negatives = complete["negatives"].to_list()
    names = ["negative"] if n == 1 else [f"negative_{i}" for i in range(1, n + 1)]
    for i, name in enumerate(names):
        out[name] = [row[i] for row in negatives]
    dropped = df["qid"].n_unique() - complete.height
    return pa.table(out), dropped
