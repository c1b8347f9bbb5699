"""Quality estimation of one translation. Pure: each check returns ``None`` (pass) or a reason.

A reason reads ``"<code>: <detail>"``; the code is one of :data:`REASONS`:

* ``empty``: nothing left after stripping;
* ``runaway``: the engine hit ``max_tokens`` (the model did not stop), or a word 3-gram repeats
  ``max_repeated_ngram`` times (a base model looping);
* ``copy``: the output is (nearly) the source, i.e. not translated: difflib's ratio of the
  case-folded, punctuation-free strings ``>= max_copy_similarity``;
* ``length_ratio``: ``len(translation) / len(source)`` in characters outside the bounds;
* ``language``: py3langid's top language is not the target, or its probability is below
  ``min_lang_prob`` (py3langid is the packaged langid.py model: 97 languages, offline);
* ``cosine``: cosine between source and translation embeddings (multilingual-e5-small, computed
  by :class:`actors.embedder.Embedder` in the pipeline) below ``min_cosine``.

The copy check and the repetition check are hand-written: they are a few lines over difflib and
a Counter, and no QE library here ships them separately.
"""

from __future__ import annotations

import difflib
import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

EMPTY, RUNAWAY, COPY, LENGTH_RATIO, LANGUAGE, COSINE = "empty", "runaway", "copy", "length_ratio", "language", "cosine"
REASONS = (EMPTY, RUNAWAY, COPY, LENGTH_RATIO, LANGUAGE, COSINE)

_WORD = re.compile(r"\w+", re.UNICODE)


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_WORD.findall(text))


def check_empty(translation: str) -> str | None:
    return f"{EMPTY}: no text" if not translation.strip() else None


def check_runaway(translation: str, num_tokens: int, max_tokens: int, max_repeated_ngram: int) -> str | None:
    if max_tokens > 0 and num_tokens >= max_tokens:
        return f"{RUNAWAY}: hit max_tokens={max_tokens}"
    words = normalize(translation).split()
    grams = Counter(zip(words, words[1:], words[2:]))
    if grams:
        gram, count = grams.most_common(1)[0]
        if count >= max_repeated_ngram:
            return f"{RUNAWAY}: {' '.join(gram)!r} repeated {count} times"
    return None


def copy_similarity(source: str, translation: str) -> float:
    return difflib.SequenceMatcher(None, normalize(source), normalize(translation), autojunk=False).ratio()


def check_copy(source: str, translation: str, max_similarity: float) -> str | None:
    sim = copy_similarity(source, translation)
    return f"{COPY}: similarity to the source {sim:.2f} >= {max_similarity}" if sim >= max_similarity else None


def length_ratio(source: str, translation: str) -> float:
    return len(translation.strip()) / max(1, len(source.strip()))


def check_length_ratio(source: str, translation: str, low: float, high: float) -> str | None:
    ratio = length_ratio(source, translation)
    if not low <= ratio <= high:
        return f"{LENGTH_RATIO}: {ratio:.2f} outside [{low}, {high}]"
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


def check_language(detected: str, prob: float, target: str, min_prob: float) -> str | None:
    if detected != target:
        return f"{LANGUAGE}: detected {detected} ({prob:.2f}), expected {target}"
    if prob < min_prob:
        return f"{LANGUAGE}: {target} with probability {prob:.2f} < {min_prob}"
    return None


def check_cosine(cosine: float | None, min_cosine: float) -> str | None:
    if cosine is not None and cosine < min_cosine:
        return f"{COSINE}: {cosine:.3f} < {min_cosine}"
    return None


def assess(
    source: str,
    translation: str,
    target: str,
    num_tokens: int,
    max_tokens: int,
    qe,
    cosine: float | None = None,
) -> dict[str, object]:
    """All checks of one translation (``qe``: a QEConfig). Returns lang, prob, ratio, reasons."""
    reasons: list[str] = []
    empty = check_empty(translation)
    if empty:
        return {"detected_lang": None, "lang_prob": None, "length_ratio": 0.0, "reasons": [empty]}
    detected, prob = identify(translation, qe.langid_candidates)
    for reason in (
        check_runaway(translation, num_tokens, max_tokens, qe.max_repeated_ngram),
        check_copy(source, translation, qe.max_copy_similarity),
        check_length_ratio(source, translation, qe.min_length_ratio, qe.max_length_ratio),
        check_language(detected, prob, target, qe.min_lang_prob),
        check_cosine(cosine, qe.min_cosine) if qe.cosine else None,
    ):
        if reason:
            reasons.append(reason)
    return {"detected_lang": detected, "lang_prob": prob, "length_ratio": length_ratio(source, translation),
            "reasons": reasons}
