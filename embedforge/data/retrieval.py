"""Retrieval: the Cranfield collection as ``queries``, ``corpus`` and ``qrels`` tables.

SMART format: a record starts with ``.I <n>``; ``.T`` title, ``.A`` authors, ``.B`` bibliography
and ``.W`` text follow, each on its own line. Document text is the ``.W`` field (which starts with
the title), whitespace-normalized. Query ids are **1..225 in file order**: the ``.I`` numbers in
``cran.qry`` skip values (001, 002, 004, ...) while ``cranqrel`` numbers queries by position.

Relevance codes in ``cranqrel`` follow ir_datasets' reading: 1 (minimum interest) .. 4 (complete
answer) are kept as graded relevance; -1 ("of no interest") becomes 0. Use
:func:`relevant_docs` for the binary ``{qid: {doc_id}}`` map sentence-transformers' evaluator
expects. Two documents (471, 995) have no text at all in the source; they go to ``bad`` (with
their line and reason) rather than into the corpus.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import polars as pl

from embedforge import schemas as S
from embedforge.data._files import data_file, frame, read_lines
from embedforge.errors import InputError

_FIELD = re.compile(r"^\.([ITABWX])(?:\s+(\S+))?\s*$")


@dataclass(frozen=True)
class RetrievalData:
    """Queries (qid, text), corpus (doc_id, text), qrels (qid, doc_id, relevance), quarantined records."""

    queries: pl.DataFrame
    corpus: pl.DataFrame
    qrels: pl.DataFrame
    bad: pl.DataFrame

    def head(self, limit: int) -> RetrievalData:
        """The first ``limit`` queries with their qrels (the corpus is kept whole)."""
        queries = self.queries.head(limit)
        qrels = self.qrels.filter(pl.col(S.QID).is_in(queries[S.QID].to_list()))
        return RetrievalData(queries, self.corpus, qrels, self.bad)


def parse_smart(lines: list[str]) -> list[tuple[int, str, dict[str, str]]]:
    """``[(line_number, .I value, {field letter: text})]`` for a SMART-format file."""
    records: list[tuple[int, str, dict[str, list[str]]]] = []
    field = None
    for lineno, line in enumerate(lines, start=1):
        m = _FIELD.match(line)
        if m and m.group(1) == "I":
            records.append((lineno, m.group(2) or "", {}))
            field = None
        elif m and m.group(2) is None:
            field = m.group(1)
            if not records:
                raise InputError(f"line {lineno}: field .{field} before the first .I record")
            records[-1][2].setdefault(field, [])
        elif field is not None:
            records[-1][2][field].append(line)
    return [(ln, rid, {k: " ".join(" ".join(v).split()) for k, v in fields.items()})
            for ln, rid, fields in records]


def relevant_docs(qrels: pl.DataFrame, min_relevance: float = 1.0) -> dict[str, set[str]]:
    """``{qid: {doc_id, ...}}`` of judgements with relevance >= ``min_relevance``."""
    out: dict[str, set[str]] = {}
    for qid, doc_id in qrels.filter(pl.col(S.RELEVANCE) >= min_relevance).select(S.QID, S.DOC_ID).iter_rows():
        out.setdefault(qid, set()).add(doc_id)
    return out


def load_cranfield() -> RetrievalData:
    docs_path = data_file("cranfield", "cran.all.1400")
    doc_ids, doc_texts, bad = [], [], {S.LINE: [], S.REASON: [], S.RAW: []}
    for lineno, rid, fields in parse_smart(read_lines(docs_path)):
        text = fields.get("W") or fields.get("T") or ""
        if not text:
            bad[S.LINE].append(lineno)
            bad[S.REASON].append(f"cran.all.1400 document {rid}: no title and no text")
            bad[S.RAW].append(json.dumps({"I": rid, **fields}))
            continue
        doc_ids.append(str(int(rid)))
        doc_texts.append(text)
    corpus = frame({S.DOC_ID: doc_ids, S.TEXT: doc_texts}, S.CORPUS)

    qry_path = data_file("cranfield", "cran.qry")
    queries_raw = parse_smart(read_lines(qry_path))
    qids = [str(i) for i in range(1, len(queries_raw) + 1)]
    qtexts = [fields.get("W", "") for _, _, fields in queries_raw]
    for (lineno, rid, _), text in zip(queries_raw, qtexts):
        if not text:
            raise InputError(f"{qry_path}:{lineno}: query .I {rid} has no .W text")
    queries = frame({S.QID: qids, S.TEXT: qtexts}, S.QUERIES)

    qrel_path = data_file("cranfield", "cranqrel")
    q, d, rel = [], [], []
    for lineno, line in enumerate(read_lines(qrel_path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise InputError(f"{qrel_path}:{lineno}: expected 'query doc code', got {line!r}")
        code = int(parts[2])
        q.append(str(int(parts[0])))
        d.append(str(int(parts[1])))
        rel.append(float(max(code, 0)))
    qrels = frame({S.QID: q, S.DOC_ID: d, S.RELEVANCE: rel}, S.QRELS)
    unknown = set(q) - set(qids)
    if unknown:
        raise InputError(f"{qrel_path}: qrels name queries {sorted(unknown, key=int)[:5]} beyond the "
                         f"{len(qids)} queries of cran.qry")
    return RetrievalData(queries, corpus, qrels, pl.DataFrame(bad, schema={S.LINE: pl.Int64, S.REASON: pl.String,
                                                                           S.RAW: pl.String}))
