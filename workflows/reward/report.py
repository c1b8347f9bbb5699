"""Per-run plots: reward distribution (gold vs mined candidates) and teacher vs gold scatter."""

from __future__ import annotations

import io
import logging

import polars as pl

from embedforge import storage

log = logging.getLogger(__name__)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def reward_histogram(feedback: pl.DataFrame) -> bytes:
    """Histogram of rewards of gold paragraphs vs mined hard negatives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for flag, label in ((True, "gold paragraph"), (False, "hard negative")):
        values = feedback.filter(pl.col("is_positive") == flag)["reward"].to_numpy()
        if len(values):
            ax.hist(values, bins=30, alpha=0.6, label=f"{label} (n={len(values)})")
    ax.set_xlabel("reward = mean log p(answer | passage, question)")
    ax.set_ylabel("pairs")
    ax.legend()
    ax.set_title("LLM-feedback rewards")
    data = _png(fig)
    plt.close(fig)
    return data


def teacher_scatter(pairs: pl.DataFrame, title: str) -> bytes:
    """Teacher score against gold score (both in [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(pairs["score"].to_numpy(), pairs["teacher_score"].to_numpy(), s=8, alpha=0.5)
    ax.set_xlabel("gold score")
    ax.set_ylabel("LLM teacher score")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    data = _png(fig)
    plt.close(fig)
    return data


def write_report(output: str, feedback: pl.DataFrame | None, sts: pl.DataFrame | None, spearman: float | None,
                 summary: dict) -> list[str]:
    """Write the PNGs and summary.json under ``output/report``; return their URIs."""
    written = []
    if feedback is not None and feedback.height:
        uri = storage.join(output, "report", "reward_distribution.png")
        storage.write_bytes(uri, reward_histogram(feedback))
        written.append(uri)
    if sts is not None and sts.height:
        uri = storage.join(output, "report", "teacher_vs_gold.png")
        title = f"LLM cross-encoder vs gold (Spearman {spearman:.3f})" if spearman is not None else "LLM teacher"
        storage.write_bytes(uri, teacher_scatter(sts, title))
        written.append(uri)
    uri = storage.join(output, "report", "summary.json")
    storage.write_json(uri, summary)
    written.append(uri)
    return written
