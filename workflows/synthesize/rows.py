"""Row bookkeeping of the synthesize stage. Pure polars: no Ray, no model.

* :func:`load_input` reads one training dataset into ``rows`` (canonical columns + ``row_id``)
  and ``bad`` (malformed rows: ``row_id, reason, raw``); nothing is dropped.
* :func:`plan_shards` cuts each input into row ranges, one shard per range and language.
* :func:`unique_sentences` lists each (sentence, language) once: NLI premises repeat, and they
  are translated once and joined back by :func:`assemble`.
* :func:`assemble` joins translations and QE results back to rows, runs the embedding checks
  of the shard (cosine floor, ratio margin within the shard, pair consistency) and splits kept
  from quarantined rows: a row is kept only when every check of every sentence passed; labels
  and scores carry over.
* :func:`parallel_sentences` lists every translated sentence that passed all of its own checks,
  from kept and quarantined rows alike: the parallel data for training (a row-level failure,
  pair consistency, says the pair's label does not carry over, not that its sentences are wrong).

Quarantined rows carry ``reasons``: ``list<struct{code, column, detail, value, threshold}>``
(one entry per failed check and column; ``column`` is the sentence column, or ``row`` for
row-level checks and malformed input), and ``reason``, the same rendered as text for reading.
Filter on ``reasons`` (``pl.col("reasons").list.eval(pl.element().struct.field("code"))``),
never on ``reason``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import polars as pl

from embedforge import schemas as S
from embedforge.data import DatasetSpec, load_dataset, load_table
from embedforge.data.spec import is_uri
from workflows.synthesize import qe as Q

TEXT_COLUMNS = {"scored_pairs": (S.SENTENCE1, S.SENTENCE2), "nli_triplets": (S.ANCHOR, S.POSITIVE, S.NEGATIVE)}
KIND, ROW_ID, TARGET_LANG = "kind", S.ROW_ID, "target_lang"
# columns of the translation table produced by the pipeline (one row per unique sentence x language)
TEXT, LANG = "text", "lang"
TRANSLATION, COSINE, DETECTED, LANG_PROB, RATIO, QE = (
    "translation", "cosine", "detected_lang", "lang_prob", "length_ratio", "qe")
MARGIN, ROUND_TRIP_CHRF, BACK = "margin", "round_trip_chrf", "back_translation"
SOURCE_EMB, TARGET_EMB = "source_embedding", "translation_embedding"  # driver-side only, never written
#: per-sentence columns copied to rows as ``<name>_<column>`` (``qe``: that sentence's failures)
QE_COLUMNS = (COSINE, DETECTED, LANG_PROB, RATIO, ROUND_TRIP_CHRF, QE)
REASONS, PAIR_SOURCE_COSINE, PAIR_COSINE = "reasons", "pair_source_cosine", "pair_cosine"
BAD_COLUMN = "bad_column"


@dataclass(frozen=True)
class InputTable:
    name: str            # e.g. "i0-stsb"
    kind: str
    rows: pl.DataFrame   # canonical columns + row_id
    bad: pl.DataFrame    # row_id, bad_column, reason, raw (one row per problem)

    @property
    def num_rows(self) -> int:
        return self.rows.height + self.bad[ROW_ID].n_unique()


@dataclass(frozen=True)
class Shard:
    name: str
    input_index: int
    lang: str
    start: int
    end: int


def _slug(source: str) -> str:
    base = source.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    return "".join(c if c.isalnum() else "_" for c in base)[:24] or "input"


def malformed(df: pl.DataFrame, kind: str) -> list[list[tuple[str, str]]]:
    """Per row, its (column, problem) pairs (empty when fine): a null or blank sentence."""
    problems = [df.select(pl.when(pl.col(c).is_null()).then(pl.lit("null"))
                          .when(pl.col(c).str.strip_chars() == "").then(pl.lit("empty text")))
                .to_series().to_list() for c in TEXT_COLUMNS[kind]]
    cols = TEXT_COLUMNS[kind]
    return [[(c, p) for c, p in zip(cols, row, strict=True) if p] for row in zip(*problems, strict=True)] \
        if df.height else []


def load_input(index: int, spec: DatasetSpec) -> InputTable:
    """Load one input; malformed rows (from the file checker or null/blank sentences) go to ``bad``.

    ``bad``: ``row_id, bad_column, reason, raw``, one row per problem (a row with two blank
    sentences has two), ``bad_column`` null for unreadable records.
    """
    kind = spec.resolved_kind
    if is_uri(spec.source):
        result = load_table(spec.source, kind)
        rows, file_bad = result.rows, result.bad
        if spec.limit:
            rows = rows.head(spec.limit)
    else:
        rows, file_bad = load_dataset(spec), pl.DataFrame(schema={S.LINE: pl.Int64, S.REASON: pl.String, S.RAW: pl.String})
    rows = rows.select(list(S.KINDS[kind].names))
    problems = malformed(rows, kind)
    is_bad = pl.Series([bool(p) for p in problems], dtype=pl.Boolean)
    bad_rows = rows.filter(is_bad)
    rows = rows.filter(~is_bad).with_row_index(ROW_ID).with_columns(pl.col(ROW_ID).cast(pl.Int64))
    n = rows.height
    entries: list[tuple[int, str | None, str, str]] = []
    for j, (record, probs) in enumerate(zip(bad_rows.to_dicts(), [p for p in problems if p], strict=True)):
        raw = json.dumps(record, ensure_ascii=False, default=str)
        entries += [(n + j, c, p, raw) for c, p in probs]
    for j, (line, reason, raw) in enumerate(zip(file_bad[S.LINE], file_bad[S.REASON], file_bad[S.RAW], strict=True)):
        entries.append((n + bad_rows.height + j, None, f"line {line}: {reason}", raw))
    bad = pl.DataFrame(entries, schema={ROW_ID: pl.Int64, BAD_COLUMN: pl.String, S.REASON: pl.String, S.RAW: pl.String},
                       orient="row")
    return InputTable(f"i{index}-{_slug(spec.source)}", kind, rows, bad)


def plan_shards(inputs: list[InputTable], langs: list[str], shard_rows: int) -> list[Shard]:
    shards = []
    for i, table in enumerate(inputs):
        for start in range(0, max(table.num_rows, 1), shard_rows):
            end = min(start + shard_rows, table.num_rows)
            for lang in langs:
                shards.append(Shard(f"{table.name}-{lang}-{start:07d}-{end:07d}", i, lang, start, end))
    return shards


def shard_rows_of(table: InputTable, shard: Shard) -> tuple[pl.DataFrame, pl.DataFrame]:
    in_range = pl.col(ROW_ID).is_between(shard.start, shard.end, closed="left")
    return table.rows.filter(in_range), table.bad.filter(in_range)


def unique_sentences(inputs: list[InputTable], shards: list[Shard]) -> pl.DataFrame:
    """One row per distinct (text, lang) that the given shards need."""
    parts = []
    for shard in shards:
        table = inputs[shard.input_index]
        rows, _ = shard_rows_of(table, shard)
        for c in TEXT_COLUMNS[table.kind]:
            parts.append(rows.select(pl.col(c).alias(TEXT), pl.lit(shard.lang).alias(LANG)))
    if not parts:
        return pl.DataFrame(schema={TEXT: pl.String, LANG: pl.String})
    return pl.concat(parts).unique(maintain_order=True)


def _margins(trans: pl.DataFrame, texts: list[str], qe) -> dict[str, float]:
    """Ratio margin of each of the shard's sentences within the shard (empty when the pool is too small)."""
    if not qe.margin or len(texts) < qe.margin_min_pool:
        return {}
    pool = trans.filter(pl.col(TEXT).is_in(texts))
    margins = Q.ratio_margin(pool[SOURCE_EMB].to_numpy(), pool[TARGET_EMB].to_numpy(), qe.margin_k)
    return dict(zip(pool[TEXT].to_list(), margins.tolist(), strict=True))


def _row_failures(row: dict, cols: tuple[str, ...], kind: str, qe, margins: dict[str, float], has_emb: bool
                  ) -> tuple[list[dict], dict[str, list[dict]], dict[str, float | None]]:
    """Failures of one row (structured), its per-sentence failure lists, and its margins."""
    reasons, per_col, margin_of = [], {}, {}
    for c in cols:
        fails = [Q.Failure(**f) for f in (row[f"{QE}_{c}"] or [])]
        margin_of[c] = margins.get(row[f"source_{c}"])
        if has_emb and qe.cosine:
            fails += [f for f in (Q.check_cosine(row[f"{COSINE}_{c}"], qe.min_cosine),
                                  Q.check_margin(margin_of[c], qe.min_margin)) if f]
        per_col[c] = [{k: v for k, v in f.record(c).items() if k != "column"} for f in fails]
        reasons += [f.record(c) for f in fails]
    if kind == "scored_pairs" and has_emb and qe.cosine and qe.pair_consistency:
        fail = Q.check_pair_consistency(row[PAIR_SOURCE_COSINE], row[PAIR_COSINE], qe.max_pair_delta)
        if fail:
            reasons.append(fail.record(Q.ROW))
    return reasons, per_col, margin_of


def render_reasons(reasons: list[dict]) -> str:
    """Failures as one line of text, for people reading a quarantine (filter on ``reasons``)."""
    def one(f: dict) -> str:
        nums = "" if f["value"] is None else (f" {f['value']:.3f}" if f["threshold"] is None
                                              else f" {f['value']:.3f} vs {f['threshold']}")
        return f"{f['column']}: {f['code']} ({f['detail']}{nums})"
    return "; ".join(one(f) for f in reasons)


def assemble(table: InputTable, shard: Shard, translations: pl.DataFrame, source_name: str, qe=None
             ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Join translations to the shard's rows, run the shard's embedding checks; split into (kept, quarantine).

    ``translations``: one row per (text, lang) with the QE stage's columns, plus
    ``source_embedding``/``translation_embedding`` when the encoder ran. ``qe``: a QEConfig
    (default thresholds when None).
    """
    from workflows.synthesize.config import QEConfig

    qe = qe or QEConfig()
    rows, bad = shard_rows_of(table, shard)
    cols = TEXT_COLUMNS[table.kind]
    trans = translations.filter(pl.col(LANG) == shard.lang).drop(LANG)
    has_emb = SOURCE_EMB in trans.columns
    df = rows
    for c in cols:
        renamed = trans.select(pl.col(TEXT).alias(c), pl.col(TRANSLATION).alias(f"{c}__t"),
                               *[pl.col(q).alias(f"{q}_{c}") for q in QE_COLUMNS if q in trans.columns])
        df = df.join(renamed, on=c, how="left")
    missing = df.filter(pl.any_horizontal([pl.col(f"{c}__t").is_null() for c in cols]))
    if missing.height:
        raise RuntimeError(f"shard {shard.name}: {missing.height} rows have no translation (pipeline lost rows)")
    # canonical columns hold the translation; the English source moves to source_<col>
    df = df.with_columns(*[pl.col(c).alias(f"source_{c}") for c in cols]).with_columns(
        *[pl.col(f"{c}__t").alias(c) for c in cols]).drop([f"{c}__t" for c in cols])
    if table.kind == "scored_pairs" and has_emb:
        emb = {k: trans.select(TEXT, k) for k in (SOURCE_EMB, TARGET_EMB)}
        vec = {(k, c): df.select(pl.col(f"source_{c}").alias(TEXT)).join(emb[k], on=TEXT, how="left")[k].to_numpy()
               for k in emb for c in cols}
        df = df.with_columns(
            pl.Series(PAIR_SOURCE_COSINE, np.sum(vec[SOURCE_EMB, cols[0]] * vec[SOURCE_EMB, cols[1]], axis=1),
                      dtype=pl.Float64),
            pl.Series(PAIR_COSINE, np.sum(vec[TARGET_EMB, cols[0]] * vec[TARGET_EMB, cols[1]], axis=1),
                      dtype=pl.Float64))
    texts = pl.concat([df[f"source_{c}"] for c in cols]).unique(maintain_order=True).to_list() if df.height else []
    margins = _margins(trans, texts, qe) if has_emb else {}
    reasons, per_col, margin_of = [], {c: [] for c in cols}, {c: [] for c in cols}
    for row in df.iter_rows(named=True):
        r, pc, m = _row_failures(row, cols, table.kind, qe, margins, has_emb)
        reasons.append(r)
        for c in cols:
            per_col[c].append(pc[c])
            margin_of[c].append(m[c])
    failure = Q.failure_dtype()
    sentence_failure = Q.failure_dtype(with_column=False)
    df = df.with_columns(pl.Series(REASONS, reasons, dtype=failure),
                         *[pl.Series(f"{QE}_{c}", per_col[c], dtype=sentence_failure) for c in cols],
                         *[pl.Series(f"{MARGIN}_{c}", margin_of[c], dtype=pl.Float64) for c in cols])
    if table.kind == "scored_pairs":
        df = df.with_columns(pl.lit(shard.lang).alias(S.LANG1), pl.lit(shard.lang).alias(S.LANG2))
    else:
        df = df.with_columns(pl.lit(shard.lang).alias(S.LANG))
    meta = [pl.lit(table.kind).alias(KIND), pl.lit(source_name).alias(S.SOURCE), pl.lit(shard.lang).alias(TARGET_LANG)]
    df = df.with_columns(meta).sort(ROW_ID)
    is_kept = pl.col(REASONS).list.len() == 0
    kept = df.filter(is_kept).drop(REASONS)
    rejected = df.filter(~is_kept).with_columns(pl.lit(None, pl.String).alias(S.RAW))
    rejected = rejected.with_columns(pl.Series(S.REASON, [render_reasons(r) for r in rejected[REASONS].to_list()],
                                               dtype=pl.String))
    quarantine = pl.concat([rejected, _malformed_rows(bad, meta, failure)], how="diagonal_relaxed").sort(ROW_ID)
    return kept, quarantine


PARALLEL_COLUMNS = ("row_id", "column", "source_sentence", "sentence", TARGET_LANG, COSINE, MARGIN)


def parallel_sentences(kept: pl.DataFrame, quarantine: pl.DataFrame, kind: str) -> pl.DataFrame:
    """One row per (row, sentence column) whose translation passed every check of that sentence.

    Columns: ``row_id``, ``column`` (the sentence column it came from), ``source_sentence`` (the
    English original), ``sentence`` (the translation), ``target_lang``, ``cosine`` and ``margin``
    (null where the embedding checks did not run). A sentence is taken from a quarantined row when
    that row's ``qe_<column>`` list is empty: its failures were another sentence's or the row's
    (pair consistency). Malformed rows have no translation and give nothing.
    """
    parts = []
    for frame in (kept, quarantine):
        for c in TEXT_COLUMNS[kind]:
            if c not in frame.columns or f"source_{c}" not in frame.columns:
                continue
            ok = pl.col(f"source_{c}").is_not_null() & pl.col(c).is_not_null()
            if f"{QE}_{c}" in frame.columns:
                ok = ok & (pl.col(f"{QE}_{c}").list.len().fill_null(0) == 0)
            parts.append(frame.filter(ok).select(
                pl.col(ROW_ID), pl.lit(c).alias("column"), pl.col(f"source_{c}").alias("source_sentence"),
                pl.col(c).alias("sentence"), pl.col(TARGET_LANG),
                (pl.col(f"{COSINE}_{c}") if f"{COSINE}_{c}" in frame.columns else pl.lit(None)).cast(pl.Float64)
                .alias(COSINE),
                (pl.col(f"{MARGIN}_{c}") if f"{MARGIN}_{c}" in frame.columns else pl.lit(None)).cast(pl.Float64)
                .alias(MARGIN)))
    schema = {ROW_ID: pl.Int64, "column": pl.String, "source_sentence": pl.String, "sentence": pl.String,
              TARGET_LANG: pl.String, COSINE: pl.Float64, MARGIN: pl.Float64}
    if not parts:
        return pl.DataFrame(schema=schema)
    return pl.concat([p.cast(schema) for p in parts]).sort(ROW_ID, "column")


def _malformed_rows(bad: pl.DataFrame, meta: list[pl.Expr], failure: pl.DataType) -> pl.DataFrame:
    """One quarantine row per malformed input row, its problems as ``malformed`` failures."""
    records: dict[int, dict] = {}
    for row_id, column, detail, raw in bad.select(ROW_ID, BAD_COLUMN, S.REASON, S.RAW).iter_rows():
        rec = records.setdefault(row_id, {ROW_ID: row_id, S.RAW: raw, REASONS: []})
        rec[REASONS].append({"code": Q.MALFORMED, "column": column or Q.ROW, "detail": detail,
                             "value": None, "threshold": None})
    out = pl.DataFrame(list(records.values()), schema={ROW_ID: pl.Int64, S.RAW: pl.String, REASONS: failure})
    return out.with_columns(pl.Series(S.REASON, [render_reasons(r) for r in out[REASONS].to_list()],
                                      dtype=pl.String), *meta)


def reason_codes(reasons: pl.Expr | str = REASONS) -> pl.Expr:
    """``list<str>`` of the failure codes of a ``reasons`` (or ``qe_<col>``) column."""
    col = pl.col(reasons) if isinstance(reasons, str) else reasons
    return col.list.eval(pl.element().struct.field("code"))


def has_code(code: str, reasons: pl.Expr | str = REASONS) -> pl.Expr:
    return reason_codes(reasons).list.contains(code)


def load_synthesized_frame(data: pl.DataFrame, kind: str) -> pl.DataFrame:
    """Rows of one kind from a synthesize ``data`` output, canonical columns first."""
    df = data.filter(pl.col(KIND) == kind)
    canonical = list(S.KINDS[kind].names)
    rest = [c for c in df.columns if c not in canonical and df[c].null_count() < df.height]
    return df.select(canonical + rest)
