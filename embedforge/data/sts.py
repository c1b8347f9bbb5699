"""Scored sentence pairs: STS Benchmark, its DeepL translations (stsb_multi_mt), cross-lingual
pairs built from them, and SICK relatedness.

Every loader returns the canonical scored-pairs table (``sentence1, sentence2, score, lang1,
lang2``) with ``score`` a float32 in [0, 1]:

* STS-B and stsb_multi_mt: ``score / 5``;
* SICK-R: relatedness 1..5 mapped by ``(x - 1) / 4``; SemEval_set TRAIN / TRIAL / TEST become
  train / dev / test.

Example::

    >>> df = load_stsb_multi_mt("de", "dev")
    >>> df.columns
    ['sentence1', 'sentence2', 'score', 'lang1', 'lang2']
"""

from __future__ import annotations

import csv
import logging

import polars as pl

from embedforge import schemas as S
from embedforge.data._files import data_file, frame, read_lines
from embedforge.errors import InputError

log = logging.getLogger(__name__)

STSB_MULTI_MT_LANGS = ("de", "en", "es", "fr", "it", "ja", "nl", "pl", "pt", "ru", "zh")
SICK_SPLITS = {"TRAIN": "train", "TRIAL": "dev", "TEST": "test"}
_STSB_FILES = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}


def _check_scores(df: pl.DataFrame, what: str) -> pl.DataFrame:
    bad = df.filter(~pl.col(S.SCORE).is_between(0.0, 1.0))
    if bad.height:
        raise InputError(f"{what}: {bad.height} scores outside [0, 1] after normalization, e.g. {bad.row(0)}")
    return df


def load_stsb(split: str) -> pl.DataFrame:
    """STS Benchmark (English) from ``stsbenchmark/sts-<split>.csv``.

    The files are tab-separated ``genre, file, year, id, score, sentence1, sentence2``; some lines
    carry two extra trailing fields (the news source), which are ignored. Quotes are literal text,
    so the lines are split on tabs rather than read with a CSV quoting dialect.
    """
    path = data_file("stsbenchmark", _STSB_FILES[split])
    s1, s2, score = [], [], []
    for lineno, line in enumerate(read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) < 7:
            raise InputError(f"{path}:{lineno}: expected at least 7 tab-separated fields, got {len(fields)}")
        score.append(_unit_score(fields[4], f"{path}:{lineno}"))
        s1.append(fields[5].strip())
        s2.append(fields[6].strip())
    n = len(s1)
    df = frame({S.SENTENCE1: s1, S.SENTENCE2: s2, S.SCORE: score, S.LANG1: ["en"] * n, S.LANG2: ["en"] * n},
               S.SCORED_PAIRS)
    return _check_scores(df, str(path))


def _unit_score(text: str, where: str) -> float:
    """A 0-5 similarity score scaled to 0-1 (an InputError naming ``where`` when it is no number)."""
    try:
        return float(text) / 5.0
    except ValueError:
        raise InputError(f"{where}: score {text!r} is not a number") from None


def _read_multi_mt(lang: str, split: str) -> tuple[list[str], list[str], list[float]]:
    if lang not in STSB_MULTI_MT_LANGS:
        raise InputError(f"stsb_multi_mt has no language {lang!r}; available: {', '.join(STSB_MULTI_MT_LANGS)}")
    path = data_file("stsb_multi_mt", f"stsb-{lang}-{split}.csv")
    s1, s2, score = [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, fields in enumerate(csv.reader(f), start=1):
            if len(fields) != 3:
                raise InputError(f"{path}: record {lineno}: expected 3 CSV fields "
                                 f"(sentence1, sentence2, score), got {len(fields)}")
            score.append(_unit_score(fields[2], f"{path}: record {lineno}"))
            s1.append(fields[0].strip())
            s2.append(fields[1].strip())
    return s1, s2, score


def load_stsb_multi_mt(lang: str, split: str) -> pl.DataFrame:
    """STS-B in one of :data:`STSB_MULTI_MT_LANGS` (``stsb_multi_mt/stsb-<lang>-<split>.csv``, no header)."""
    s1, s2, score = _read_multi_mt(lang, split)
    n = len(s1)
    df = frame({S.SENTENCE1: s1, S.SENTENCE2: s2, S.SCORE: score, S.LANG1: [lang] * n, S.LANG2: [lang] * n},
               S.SCORED_PAIRS)
    return _check_scores(df, f"stsb_multi_mt {lang} {split}")


def load_stsb_crosslingual(lang1: str, lang2: str, split: str) -> pl.DataFrame:
    """Cross-lingual STS: ``sentence1`` from the ``lang1`` file, ``sentence2`` from the ``lang2`` file.

    stsb_multi_mt translates STS-B row by row, so row i of every language is the same pair with the
    same gold score. That alignment is verified here (same row count and identical score in every
    row) and an InputError names the first row where it breaks.
    """
    a1, _, score1 = _read_multi_mt(lang1, split)
    _, b2, score2 = _read_multi_mt(lang2, split)
    if len(a1) != len(b2):
        raise InputError(f"stsb_multi_mt {split}: {lang1} has {len(a1)} rows but {lang2} has {len(b2)}; "
                         "the files are not row-aligned")
    for i, (x, y) in enumerate(zip(score1, score2)):
        if abs(x - y) > 1e-6:
            raise InputError(f"stsb_multi_mt {split}: row {i + 1} has score {x * 5} in {lang1} but {y * 5} "
                             f"in {lang2}; the files are not row-aligned")
    n = len(a1)
    df = frame({S.SENTENCE1: a1, S.SENTENCE2: b2, S.SCORE: score1, S.LANG1: [lang1] * n,
                S.LANG2: [lang2] * n}, S.SCORED_PAIRS)
    return _check_scores(df, f"stsb_crosslingual {lang1}-{lang2} {split}")


def read_sick() -> pl.DataFrame:
    """The raw SICK table (all 9,840 pairs, header columns as in ``SICK.txt``) plus a ``split`` column."""
    path = data_file("sick", "SICK.txt")
    df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False)
    S.require_columns(df.columns, ["sentence_A", "sentence_B", "entailment_label", "relatedness_score",
                                   "entailment_AB", "entailment_BA", "SemEval_set"], str(path))
    unknown = set(df["SemEval_set"].unique().to_list()) - set(SICK_SPLITS)
    if unknown:
        raise InputError(f"{path}: unknown SemEval_set values {sorted(unknown)}; expected {sorted(SICK_SPLITS)}")
    return df.with_columns(
        pl.col("SemEval_set").replace_strict(SICK_SPLITS).alias(S.SPLIT),
        pl.col("sentence_A").str.strip_chars(),
        pl.col("sentence_B").str.strip_chars(),
    )


def load_sick_relatedness(split: str) -> pl.DataFrame:
    """SICK-R: ``sentence_A, sentence_B`` with relatedness 1..5 mapped to ``(x - 1) / 4``."""
    df = read_sick().filter(pl.col(S.SPLIT) == split)
    out = df.select(
        pl.col("sentence_A").alias(S.SENTENCE1),
        pl.col("sentence_B").alias(S.SENTENCE2),
        ((pl.col("relatedness_score").cast(pl.Float64) - 1.0) / 4.0).cast(pl.Float32).alias(S.SCORE),
        pl.lit("en").alias(S.LANG1),
        pl.lit("en").alias(S.LANG2),
    )
    return _check_scores(out, f"SICK {split}")
