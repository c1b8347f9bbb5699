"""Teacher math of the reward workflow (pure numpy/polars, no model).

The per-pair scores (the reward ``r`` and the cross-encoder's expected score) are computed by
the scorer (:mod:`actors.reward_scorer`); this module turns them into training labels:

* teacher distribution over the candidates C(q) of a query: ``p(c | q) = softmax(r_c / T)``,
  the soft label the embedder distils from (KL to its own softmax over similarities);
* Spearman agreement of teacher scores with gold scores.

The softmax is written out (log-sum-exp) rather than imported because it runs per group over
a polars frame; scipy's softmax has no grouping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl


def softmax(values: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    """Numerically stable ``softmax(values / temperature)``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = np.asarray(values, dtype=np.float64) / temperature
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def teacher_distribution(df: pl.DataFrame, temperature: float, group: str = "qid", reward: str = "reward",
                         out: str = "teacher_prob") -> pl.DataFrame:
    """Add ``out`` = softmax(reward / T) within each ``group`` (sums to 1 per group)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = pl.col(reward) / temperature
    shifted = scaled - scaled.max().over(group)
    return df.with_columns((shifted.exp() / shifted.exp().sum().over(group)).alias(out))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (scipy), NaN when undefined (fewer than 3 pairs or constant input)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)
