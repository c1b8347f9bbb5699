"""Question answering: XQuAD (``qid, question, context, answer, lang, article``) and GSM8K
(``question, answer, final``).

XQuAD ships only one split (240 paragraphs of 48 SQuAD articles, parallel in 12 languages), so a
train/test split is made **by article**: articles are ranked by the SHA-256 of their English
title and the first ``round(48 * test_fraction)`` form ``test``. The files are parallel (same
articles, paragraphs and question ids in the same order; titles are English in every file), and
this is verified before the English titles are used, so the split is the same in every
language. ``article`` holds the English title.

:func:`load_xquad_crosslingual` pairs questions in one language with contexts (and answers) in
another, e.g. German questions against English paragraphs.

GSM8K: ``answer`` is the worked solution; ``final`` the number after ``####`` with thousands
separators removed (``"1,080"`` -> ``"1080"``).
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache

import polars as pl

from embedforge import schemas as S
from embedforge.data._files import data_file, frame, read_lines
from embedforge.errors import InputError

XQUAD_LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@lru_cache(maxsize=16)
def _xquad_json(lang: str) -> dict:
    if lang not in XQUAD_LANGS:
        raise InputError(f"xquad has no language {lang!r}; available: {', '.join(XQUAD_LANGS)}")
    path = data_file("xquad", f"xquad.{lang}.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def _structure(lang: str) -> list[tuple[str, list[list[str]]]]:
    """``[(title, [[question ids of each paragraph]])]`` for one language."""
    return [(a["title"], [[q["id"] for q in p["qas"]] for p in a["paragraphs"]]) for a in _xquad_json(lang)["data"]]


def _flatten(lang: str) -> pl.DataFrame:
    """One row per question: qid, question, context, answer (first gold answer), article index."""
    rows = []
    for index, article in enumerate(_xquad_json(lang)["data"]):
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if not qa.get("answers"):
                    raise InputError(f"xquad {lang}: question {qa['id']} has no answer")
                rows.append((qa["id"], qa["question"].strip(), paragraph["context"].strip(),
                             qa["answers"][0]["text"].strip(), index))
    return pl.DataFrame(rows, schema=[S.QID, S.QUESTION, S.CONTEXT, S.ANSWER, "_article_index"], orient="row")


def xquad_test_articles(test_fraction: float = 0.5) -> set[str]:
    """English titles of the held-out (``test``) articles; the same for every language."""
    titles = [t for t, _ in _structure("en")]
    n_test = round(len(titles) * test_fraction)
    ranked = sorted(titles, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    return set(ranked[:n_test])


def _check_parallel(lang: str) -> list[str]:
    en, other = _structure("en"), _structure(lang)
    if other != en:
        raise InputError(f"xquad {lang} is not parallel to English (articles, paragraphs or question ids "
                         "differ); the article split would not be language-independent")
    return [t for t, _ in en]


def _split_filter(df: pl.DataFrame, split: str, test_fraction: float) -> pl.DataFrame:
    if split == "all":
        return df
    test = xquad_test_articles(test_fraction)
    is_test = pl.col(S.ARTICLE).is_in(sorted(test))
    return df.filter(is_test if split == "test" else ~is_test)


def load_xquad_crosslingual(question_lang: str, context_lang: str, split: str,
                            test_fraction: float = 0.5) -> pl.DataFrame:
    """Questions in ``question_lang`` with contexts and answers in ``context_lang``.

    ``lang`` holds the question language. Rows are matched by question id, which XQuAD keeps
    identical across languages.
    """
    titles = _check_parallel(question_lang)
    _check_parallel(context_lang)
    q = _flatten(question_lang).select(S.QID, S.QUESTION, "_article_index")
    c = _flatten(context_lang).select(S.QID, S.CONTEXT, S.ANSWER)
    df = q.join(c, on=S.QID, how="inner", maintain_order="left")
    if df.height != q.height:
        raise InputError(f"xquad {question_lang}/{context_lang}: only {df.height} of {q.height} question ids match")
    df = df.with_columns(
        pl.col("_article_index").replace_strict(dict(enumerate(titles)), return_dtype=pl.String).alias(S.ARTICLE),
        pl.lit(question_lang).alias(S.LANG),
    ).select(S.QA.names)
    return _split_filter(df, split, test_fraction)


def load_xquad(lang: str, split: str, test_fraction: float = 0.5) -> pl.DataFrame:
    """XQuAD in ``lang`` (question, context and answer in the same language)."""
    return load_xquad_crosslingual(lang, lang, split, test_fraction)


def final_answer(answer: str) -> str:
    """The number after ``####`` in a GSM8K solution, commas removed; InputError if there is none."""
    if "####" not in answer:
        raise InputError(f"GSM8K answer has no '####' final-answer marker: {answer[-80:]!r}")
    tail = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not _NUMBER.fullmatch(tail):
        raise InputError(f"GSM8K final answer {tail!r} is not a number")
    return tail


def load_gsm8k(split: str) -> pl.DataFrame:
    """GSM8K ``train`` (7,473) or ``test`` (1,319) problems."""
    path = data_file("gsm8k", f"{split}.jsonl")
    questions, answers, finals = [], [], []
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            finals.append(final_answer(row["answer"]))
        except (json.JSONDecodeError, KeyError, InputError) as e:
            raise InputError(f"{path}:{lineno}: {e}") from e
        questions.append(row["question"].strip())
        answers.append(row["answer"].strip())
    return frame({S.QUESTION: questions, S.ANSWER: answers, S.FINAL: finals}, S.MATH_QA)
