"""Quality estimation of translations. Pure: no Ray, no model; each check returns ``None`` or a :class:`Failure`.

A :class:`Failure` is structured (``code``, ``detail``, ``value``, ``threshold``); the pipeline
stores every failure of a row as a ``list<struct{code, column, detail, value, threshold}>``
column (:data:`FAILURE_DTYPE`), so nobody parses prose. Codes (:data:`REASONS`):

Text checks (one sentence, in the Ray Data QE stage):

* ``empty``: nothing left after stripping;
* ``runaway``: the engine hit ``max_tokens`` (the model did not stop), or a word 3-gram repeats
  ``max_repeated_ngram`` times (a base model looping);
* ``copy``: the output is (nearly) the source, i.e. not translated: difflib's ratio of the
  case-folded, punctuation-free strings ``>= max_copy_similarity``;
* ``length_ratio``: translation length / source length outside the bounds. The length unit is
  ``tokens`` of the translation model's tokenizer by default: characters penalize scripts that
  pack more per character (a correct Chinese translation of an English sentence has about 0.3x
  its characters, but about as many Gemma tokens); ``chars`` keeps the character ratio;
* ``language``: py3langid's top language is not the target, or its probability is below
  ``min_lang_prob`` (py3langid is the packaged langid.py model: 97 languages, offline);
* ``round_trip`` (optional): chrF (sacrebleu) of the back-translation into the source language
  against the source below ``min_round_trip_chrf``.

Embedding checks (multilingual-e5-small embeddings, computed per shard when rows are assembled):

* ``cosine``: cosine(source, translation) below ``min_cosine`` (a floor);
* ``margin``: the ratio margin of Artetxe & Schwenk (2019), "Margin-based Parallel Corpus Mining
  with Multilingual Sentence Embeddings", as LASER's ``source/mine_bitexts.py --mode score
  --margin ratio`` computes it: ``cos(x, y) / ((mean kNN_k cos of x among all targets + mean
  kNN_k cos of y among all sources) / 2)`` with ``k = min(k, pool size)``, neighbours taken
  within the pool (the candidate itself included, as in LASER). The pool here is one shard's
  sentences of one language, not a whole corpus (see :func:`ratio_margin`);
* ``pair_consistency`` (scored pairs): ``|cos(t1, t2) - cos(s1, s2)|`` above
  ``max_pair_delta``: the pair's relation did not survive translation, so its label is not valid
  for it and the row is quarantined (the label is not rewritten: a guessed score is not data);
* ``malformed``: the input row itself was bad (null or blank sentence, unreadable record).

The copy and repetition checks are hand-written: a few lines over difflib and a Counter, and no
QE library here ships them separately. The margin is written out in numpy (a top-k over a
pool of a few hundred rows; faiss is not a dependency).
"""

from __future__ import annotations

import difflib
import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

EMPTY, RUNAWAY, COPY, LENGTH_RATIO, LANGUAGE = "empty", "runaway", "copy", "length_ratio", "language"
ROUND_TRIP, COSINE, MARGIN, PAIR_CONSISTENCY, MALFORMED = (
    "round_trip", "cosine", "margin", "pair_consistency", "malformed")
#: checks of one translated sentence
SENTENCE_REASONS = (EMPTY, RUNAWAY, COPY, LENGTH_RATIO, LANGUAGE, ROUND_TRIP, COSINE, MARGIN)
REASONS = SENTENCE_REASONS + (PAIR_CONSISTENCY, MALFORMED)
#: ``column`` of failures that belong to the whole row rather than one sentence
ROW = "row"

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Failure:
    """One failed check: ``value`` measured against ``threshold`` (both None where not numeric)."""

    code: str
    detail: str
    value: float | None = None
    threshold: float | None = None

    def record(self, column: str) -> dict[str, object]:
        return {"code": self.code, "column": column, **{k: v for k, v in asdict(self).items() if k != "code"}}


def failure_dtype(with_column: bool = True):
    """Polars type of a failure list: ``list<struct{code, column, detail, value, threshold}>``.

    Without ``column``: the per-sentence lists (``qe_<column>``), whose column is in their name.
    """
    import polars as pl

    fields = {"code": pl.String, "column": pl.String, "detail": pl.String, "value": pl.Float64,
              "threshold": pl.Float64}
    if not with_column:
        del fields["column"]
    return pl.List(pl.Struct(fields))


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_WORD.findall(text))


def check_empty(translation: str) -> Failure | None:
    return Failure(EMPTY, "no text") if not translation.strip() else None


def check_runaway(translation: str, num_tokens: int, max_tokens: int, max_repeated_ngram: int) -> Failure | None:
    if max_tokens > 0 and num_tokens >= max_tokens:
        return Failure(RUNAWAY, "hit max_tokens", float(num_tokens), float(max_tokens))
    words = normalize(translation).split()
    grams = Counter(zip(words, words[1:], words[2:]))
    if grams:
        gram, count = grams.most_common(1)[0]
        if count >= max_repeated_ngram:
            return Failure(RUNAWAY, f"{' '.join(gram)!r} repeated", float(count), float(max_repeated_ngram))
    return None


def copy_similarity(source: str, translation: str) -> float:
    return difflib.SequenceMatcher(None, normalize(source), normalize(translation), autojunk=False).ratio()


def check_copy(source: str, translation: str, max_similarity: float) -> Failure | None:
    sim = copy_similarity(source, translation)
    return Failure(COPY, "similarity to the source", sim, max_similarity) if sim >= max_similarity else None


def length_ratio(source_length: int, translation_length: int) -> float:
    return translation_length / max(1, source_length)


def check_length_ratio(ratio: float, low: float, high: float, unit: str) -> Failure | None:
    if ratio < low:
        return Failure(LENGTH_RATIO, f"too short ({unit})", ratio, low)
    if ratio > high:
        return Failure(LENGTH_RATIO, f"too long ({unit})", ratio, high)
    return None


@functools.lru_cache(maxsize=8)
def language_identifier(candidates: tuple[str, ...] | None = None):
    """py3langid's model with normalized probabilities (loaded once per process)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    if candidates:
        ident.set_languages(list(candidates))
    return ident


def identify(text: str, candidates: Sequence[str] | None = None) -> tuple[str, float]:
    lang, prob = language_identifier(tuple(candidates) if candidates else None).classify(text)
    return str(lang), float(prob)


def check_language(detected: str, prob: float, target: str, min_prob: float) -> Failure | None:
    if detected != target:
        return Failure(LANGUAGE, f"detected {detected}, expected {target}", prob, None)
    if prob < min_prob:
        return Failure(LANGUAGE, f"{target} with low probability", prob, min_prob)
    return None


def round_trip_chrf(source: str, back_translation: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(back_translation, [source]).score)


def check_round_trip(chrf: float | None, min_chrf: float) -> Failure | None:
    if chrf is not None and chrf < min_chrf:
        return Failure(ROUND_TRIP, "chrF of the back-translation against the source", chrf, min_chrf)
    return None


def check_cosine(cosine: float | None, min_cosine: float) -> Failure | None:
    if cosine is not None and cosine < min_cosine:
        return Failure(COSINE, "cosine(source, translation)", cosine, min_cosine)
    return None


def check_margin(margin: float | None, min_margin: float) -> Failure | None:
    if margin is not None and margin < min_margin:
        return Failure(MARGIN, "ratio margin of cosine(source, translation) in its shard", margin, min_margin)
    return None


def check_pair_consistency(source_sim: float, translated_sim: float, max_delta: float) -> Failure | None:
    delta = translated_sim - source_sim
    if abs(delta) > max_delta:
        return Failure(PAIR_CONSISTENCY, f"pair cosine {source_sim:.3f} in the source, {translated_sim:.3f} "
                                         f"translated", abs(delta), max_delta)
    return None


def ratio_margin(source: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """LASER's ratio margin of aligned rows: ``cos(x_i, y_i) / ((fwd_i + bwd_i) / 2)``.

    ``source`` and ``target``: L2-normalized embeddings ``[n, d]``, row i of one the translation
    of row i of the other. ``fwd_i`` is the mean cosine of x_i to its k nearest targets, ``bwd_i``
    the mean cosine of y_i to its k nearest sources (``k = min(k, n)``, the aligned row included),
    as in ``mine_bitexts.py`` (``knn`` + ``score``).
    """
    n = source.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    k = min(k, n)
    sims = source @ target.T
    fwd = -np.sort(-sims, axis=1)[:, :k].mean(axis=1)
    bwd = -np.sort(-sims.T, axis=1)[:, :k].mean(axis=1)
    return (np.diag(sims) / ((fwd + bwd) / 2)).astype(np.float32)


def text_checks(
    source: str,
    translation: str,
    target: str,
    num_tokens: int,
    max_tokens: int,
    qe,
    source_length: int | None = None,
    translation_length: int | None = None,
    back_chrf: float | None = None,
) -> dict[str, object]:
    """The text checks of one translation (``qe``: a QEConfig).

    ``source_length``/``translation_length``: lengths in ``qe.length_unit`` (tokens); when None
    the character lengths are used. Returns detected_lang, lang_prob, length_ratio, failures.
    """
    empty = check_empty(translation)
    if empty:
        return {"detected_lang": None, "lang_prob": None, "length_ratio": 0.0, "failures": [empty]}
    unit = "tokens" if source_length is not None and translation_length is not None else "chars"
    if unit == "chars":
        source_length, translation_length = len(source.strip()), len(translation.strip())
    ratio = length_ratio(source_length, translation_length)
    detected, prob = identify(translation, qe.langid_candidates)
    checks = (
        check_runaway(translation, num_tokens, max_tokens, qe.max_repeated_ngram),
        check_copy(source, translation, qe.max_copy_similarity),
        check_length_ratio(ratio, qe.min_length_ratio, qe.max_length_ratio, unit),
        check_language(detected, prob, target, qe.min_lang_prob),
        check_round_trip(back_chrf, qe.min_round_trip_chrf),
    )
    return {"detected_lang": detected, "lang_prob": prob, "length_ratio": ratio,
            "failures": [f for f in checks if f is not None]}
