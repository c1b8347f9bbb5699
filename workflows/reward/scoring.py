"""Reward and teacher math (pure numpy/polars, no model).

* reward of a (query, candidate) pair, LLM-Embedder (Zhang et al. 2023, "Retrieve Anything To
  Augment Large Language Models"): ``r = (1/|a|) * sum_t log p(a_t | prompt(candidate, query), a_<t)``;
* teacher distribution over the candidates C(q) of a query: ``p(c | q) = softmax(r_c / T)``,
  the soft label the embedder distils from (KL to its own softmax over similarities);
* LLM cross-encoder (DSE, Reimers & Gurevych / "Distilled Sentence Embedding"): with the
  next-token log-probs ``l_k`` of the score tokens ``k = 0..K``, the expected score is
  ``sum_k k * softmax(l)_k / K`` in [0, 1] (renormalized over the score tokens), and the mass
  ``sum_k exp(l_k)`` says how much of the distribution the score tokens hold.

The softmax is written out (log-sum-exp) rather than imported because it runs per group over
a polars frame; scipy's softmax has no grouping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from embedforge.errors import InputError


def mean_logprob(token_logprobs: Sequence[float]) -> float:
    """Mean per-token log-probability of a continuation (the reward)."""
    if len(token_logprobs) == 0:
        raise InputError("a reward needs at least one answer token; the answer is empty")
    return float(np.mean(np.asarray(token_logprobs, dtype=np.float64)))


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


def expected_score(logprobs: Mapping[int, float], score_token_ids: Sequence[int]) -> tuple[float, float]:
    """``(expected score in [0, 1], probability mass on the score tokens)``.

    ``logprobs`` maps token id -> log-prob (e.g. vLLM's top-20 of one generated step); score
    tokens missing from it count as probability 0. Raises InputError if none is present.
    """
    present = [(k, logprobs[t]) for k, t in enumerate(score_token_ids) if t in logprobs]
    if not present:
        raise InputError("no score token among the top log-probs; the model did not answer with a score")
    ks = np.array([k for k, _ in present], dtype=np.float64)
    lps = np.array([lp for _, lp in present], dtype=np.float64)
    probs = softmax(lps)
    max_k = len(score_token_ids) - 1
    return float((probs * ks).sum() / max_k), float(np.exp(lps).sum())


def expected_score_from_list(score_logprobs: Sequence[float]) -> tuple[float, float]:
    """Same as :func:`expected_score` when every score token's log-prob is known (index = score)."""
    return expected_score(dict(enumerate(score_logprobs)), list(range(len(score_logprobs))))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (scipy), NaN when undefined (fewer than 3 pairs or constant input)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)
