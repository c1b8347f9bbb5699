"""Canonical column names and Arrow schemas shared by loaders, pipelines and trainers.

Everything that moves between stages is one of these tables; stages check their input
columns with :func:`require_columns` and name both the missing and the received ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from embedforge.errors import InputError

# scored pairs (STS): score normalized to [0, 1]
SENTENCE1, SENTENCE2, SCORE, LANG1, LANG2 = "sentence1", "sentence2", "score", "lang1", "lang2"
# NLI triplets
ANCHOR, POSITIVE, NEGATIVE, LANG = "anchor", "positive", "negative", "lang"
# bitext
SRC, TGT, SRC_LANG, TGT_LANG = "src", "tgt", "src_lang", "tgt_lang"
# retrieval
QID, DOC_ID, TEXT, RELEVANCE = "qid", "doc_id", "text", "relevance"
# QA
QUESTION, CONTEXT, ANSWER, ARTICLE = "question", "context", "answer", "article"
# bookkeeping every dataset row may carry
ROW_ID, SPLIT, SOURCE = "row_id", "split", "source"
# quarantine
REASON = "reason"
LINE, RAW = "line", "raw"
# math word problems (GSM8K): the final numeric answer, normalized (no thousands separators)
FINAL = "final"

SCORED_PAIRS = pa.schema([
    (SENTENCE1, pa.string()), (SENTENCE2, pa.string()), (SCORE, pa.float32()),
    (LANG1, pa.string()), (LANG2, pa.string()),
])
NLI_TRIPLETS = pa.schema([(ANCHOR, pa.string()), (POSITIVE, pa.string()), (NEGATIVE, pa.string()), (LANG, pa.string())])
BITEXT = pa.schema([(SRC, pa.string()), (TGT, pa.string()), (SRC_LANG, pa.string()), (TGT_LANG, pa.string())])
QUERIES = pa.schema([(QID, pa.string()), (TEXT, pa.string())])
CORPUS = pa.schema([(DOC_ID, pa.string()), (TEXT, pa.string())])
QRELS = pa.schema([(QID, pa.string()), (DOC_ID, pa.string()), (RELEVANCE, pa.float32())])
QA = pa.schema([
    (QID, pa.string()), (QUESTION, pa.string()), (CONTEXT, pa.string()), (ANSWER, pa.string()),
    (LANG, pa.string()), (ARTICLE, pa.string()),
])
MATH_QA = pa.schema([(QUESTION, pa.string()), (ANSWER, pa.string()), (FINAL, pa.string())])
QUARANTINE = pa.schema([(LINE, pa.int64()), (REASON, pa.string()), (RAW, pa.string())])

KINDS: dict[str, pa.Schema] = {
    "scored_pairs": SCORED_PAIRS,
    "nli_triplets": NLI_TRIPLETS,
    "bitext": BITEXT,
    "qa": QA,
    "queries": QUERIES,
    "corpus": CORPUS,
    "qrels": QRELS,
    "math_qa": MATH_QA,
}


def require_columns(received: Iterable[str], required: Iterable[str], what: str) -> None:
    """Raise InputError naming the missing and the received columns."""
    received = list(received)
    missing = [c for c in required if c not in received]
    if missing:
        raise InputError(f"{what}: missing columns {missing}; received columns {received}")
