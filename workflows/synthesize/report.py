"""Summary of a synthesize output per language (polars) and a PNG plot (matplotlib).

Sentence-level figures count every sentence of every row (a repeated NLI premise counts once per
row it appears in). ``pass_<reason>`` is the share of translated sentences that did not fail
that check (for ``pair_consistency``: the share of translated scored pairs whose relation
survived); ``kept_share`` is the share of input rows kept (every check of the row passed).
Codes are read from the structured failure columns, never from the ``reason`` text.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import polars as pl

from embedforge import storage
from workflows.synthesize.qe import MALFORMED, PAIR_CONSISTENCY, SENTENCE_REASONS
from workflows.synthesize.rows import QE, RATIO, TARGET_LANG, TEXT_COLUMNS, has_code, reason_codes

PASS_REASONS = SENTENCE_REASONS + (PAIR_CONSISTENCY,)

log = logging.getLogger(__name__)

SUMMARY_FILE, PLOT_FILE = "report/summary.csv", "report/synthesize.png"


def sentence_table(data: pl.DataFrame, quarantine: pl.DataFrame) -> pl.DataFrame:
    """One row per translated sentence: lang, failure codes (``qe``), length ratio, source/translation lengths."""
    both = pl.concat([data, quarantine], how="diagonal_relaxed")
    parts = []
    for col in sorted({c for cols in TEXT_COLUMNS.values() for c in cols}):
        if f"{QE}_{col}" not in both.columns:
            continue
        parts.append(both.filter(pl.col(f"{QE}_{col}").is_not_null()).select(
            pl.col(TARGET_LANG), reason_codes(f"{QE}_{col}").alias(QE), pl.col(f"{RATIO}_{col}").alias(RATIO),
            pl.col(f"source_{col}").str.len_chars().alias("source_chars"),
            pl.col(col).str.len_chars().alias("translation_chars")))
    if not parts:
        return pl.DataFrame(schema={TARGET_LANG: pl.String, QE: pl.List(pl.String), RATIO: pl.Float64,
                                    "source_chars": pl.UInt32, "translation_chars": pl.UInt32})
    return pl.concat(parts, how="vertical_relaxed")


def summarize(data: pl.DataFrame, quarantine: pl.DataFrame, langs: list[str]) -> pl.DataFrame:
    """One row per language: row counts, pass rate of each QE check, length statistics."""
    sentences = sentence_table(data, quarantine)
    rows = []
    for lang in langs:
        kept = data.filter(pl.col(TARGET_LANG) == lang).height if data.height else 0
        q = quarantine.filter(pl.col(TARGET_LANG) == lang) if quarantine.height else quarantine
        malformed = int(q.select(has_code(MALFORMED)).to_series().sum()) if q.height else 0
        n_pairs, pair_failed = _pair_counts(data, q, lang)
        s = sentences.filter(pl.col(TARGET_LANG) == lang)
        row: dict[str, Any] = {"lang": lang, "rows_in": kept + q.height, "kept": kept, "quarantined": q.height,
                               "malformed": malformed, "kept_share": kept / max(1, kept + q.height),
                               "sentences": s.height}
        for reason in SENTENCE_REASONS:
            failed = int(s[QE].list.contains(reason).sum()) if s.height else 0
            row[f"pass_{reason}"] = 1.0 - failed / s.height if s.height else None
        row[f"pass_{PAIR_CONSISTENCY}"] = 1.0 - pair_failed / n_pairs if n_pairs else None
        row["mean_source_chars"] = s["source_chars"].mean() if s.height else None
        row["mean_translation_chars"] = s["translation_chars"].mean() if s.height else None
        row["median_length_ratio"] = s[RATIO].median() if s.height else None
        row["p90_length_ratio"] = s[RATIO].quantile(0.9) if s.height else None
        rows.append(row)
    return pl.DataFrame(rows)


def _pair_counts(data: pl.DataFrame, quarantine: pl.DataFrame, lang: str) -> tuple[int, int]:
    """(translated scored pairs of ``lang``, how many of them failed pair consistency); malformed rows excluded."""
    def of(df: pl.DataFrame) -> pl.DataFrame:
        if not df.height or "kind" not in df.columns:
            return df.clear()
        return df.filter((pl.col("kind") == "scored_pairs") & (pl.col(TARGET_LANG) == lang))
    kept, q = of(data), of(quarantine)
    if q.height:
        q = q.filter(~has_code(MALFORMED))
    failed = int(q.select(has_code(PAIR_CONSISTENCY)).to_series().sum()) if q.height else 0
    return kept.height + q.height, failed


def plot(summary: pl.DataFrame, sentences: pl.DataFrame) -> bytes:
    """Pass rates per check and language (bars) and length-ratio histograms, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    langs = summary["lang"].to_list()
    width = 0.8 / max(1, len(langs))
    labels = list(PASS_REASONS) + ["row kept"]
    for i, lang in enumerate(langs):
        row = summary.row(i, named=True)
        values = [row[f"pass_{r}"] or 0.0 for r in PASS_REASONS] + [row["kept_share"]]
        ax1.bar([x + i * width for x in range(len(labels))], values, width, label=lang)
        ratios = sentences.filter(pl.col(TARGET_LANG) == lang)[RATIO].drop_nulls().to_list()
        if ratios:
            ax2.hist([min(r, 4.0) for r in ratios], bins=40, alpha=0.5, label=lang)
    ax1.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=30)
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("share passing")
    ax1.set_title("QE pass rate per check")
    ax1.legend()
    ax2.set_xlabel("translation / source length (chars, clipped at 4)")
    ax2.set_title("length ratio")
    ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def build_report(data: pl.DataFrame, quarantine: pl.DataFrame, output: str, langs: list[str]) -> dict[str, Any]:
    """Write ``report/summary.csv`` and ``report/synthesize.png`` under ``output``; return them."""
    summary = summarize(data, quarantine, langs)
    storage.write_bytes(storage.join(output, SUMMARY_FILE), summary.write_csv().encode())
    storage.write_bytes(storage.join(output, PLOT_FILE), plot(summary, sentence_table(data, quarantine)))
    return {"summary": summary.to_dicts(),
            "files": {"summary": storage.join(output, SUMMARY_FILE), "plot": storage.join(output, PLOT_FILE)}}
