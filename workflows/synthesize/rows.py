"""Row bookkeeping of the synthesize stage. Pure polars: no Ray, no model.

* :func:`load_input` reads one training dataset into ``rows`` (canonical columns + ``row_id``)
  and ``bad`` (malformed rows: ``row_id, reason, raw``); nothing is dropped.
* :func:`plan_shards` cuts each input into row ranges, one shard per range and language.
* :func:`unique_sentences` lists each (sentence, language) once: NLI premises repeat, and they
  are translated once and joined back by :func:`assemble`.
* :func:`assemble` joins translations and QE results back to rows: a row is kept only when
  every one of its sentences passed; labels and scores carry over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import polars as pl

from embedforge import schemas as S
from embedforge.data import DatasetSpec, load_dataset, load_table
from embedforge.data.spec import is_uri

TEXT_COLUMNS = {"scored_pairs": (S.SENTENCE1, S.SENTENCE2), "nli_triplets": (S.ANCHOR, S.POSITIVE, S.NEGATIVE)}
KIND, ROW_ID, TARGET_LANG = "kind", S.ROW_ID, "target_lang"
# columns of the translation table produced by the pipeline (one row per unique sentence x language)
TEXT, LANG = "text", "lang"
TRANSLATION, COSINE, DETECTED, LANG_PROB, RATIO, QE = (
    "translation", "cosine", "detected_lang", "lang_prob", "length_ratio", "qe")
QE_COLUMNS = (COSINE, DETECTED, LANG_PROB, RATIO, QE)


@dataclass(frozen=True)
class InputTable:
    name: str            # e.g. "i0-stsb"
    kind: str
    rows: pl.DataFrame   # canonical columns + row_id
    bad: pl.DataFrame    # row_id, reason, raw

    @property
    def num_rows(self) -> int:
        return self.rows.height + self.bad.height


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


def malformed(df: pl.DataFrame, kind: str) -> pl.Series:
    """Reason per row ('' when fine): a null or blank sentence."""
    reasons = [pl.when(pl.col(c).is_null()).then(pl.lit(f"{c}: null"))
               .when(pl.col(c).str.strip_chars() == "").then(pl.lit(f"{c}: empty text")) for c in TEXT_COLUMNS[kind]]
    return df.select(pl.concat_str(reasons, separator="; ", ignore_nulls=True).fill_null("").alias(S.REASON))[S.REASON]


def load_input(index: int, spec: DatasetSpec) -> InputTable:
    """Load one input; malformed rows (from the file checker or null/blank sentences) go to ``bad``."""
    kind = spec.resolved_kind
    if is_uri(spec.source):
        result = load_table(spec.source, kind)
        rows, file_bad = result.rows, result.bad
        if spec.limit:
            rows = rows.head(spec.limit)
    else:
        rows, file_bad = load_dataset(spec), pl.DataFrame(schema={S.LINE: pl.Int64, S.REASON: pl.String, S.RAW: pl.String})
    rows = rows.select(list(S.KINDS[kind].names))
    reasons = malformed(rows, kind)
    bad_rows = rows.filter(reasons != "")
    rows = rows.filter(reasons == "").with_row_index(ROW_ID).with_columns(pl.col(ROW_ID).cast(pl.Int64))
    n = rows.height
    raw = [json.dumps(r, ensure_ascii=False, default=str) for r in bad_rows.to_dicts()] + file_bad[S.RAW].to_list()
    why = reasons.filter(reasons != "").to_list() + [f"line {ln}: {r}" for ln, r in
                                                        zip(file_bad[S.LINE], file_bad[S.REASON])]
    bad = pl.DataFrame({ROW_ID: list(range(n, n + len(raw))), S.REASON: why, S.RAW: raw},
                       schema={ROW_ID: pl.Int64, S.REASON: pl.String, S.RAW: pl.String})
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


def assemble(table: InputTable, shard: Shard, translations: pl.DataFrame, source_name: str
             ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Join translations to the shard's rows; split into (kept data, quarantine)."""
    rows, bad = shard_rows_of(table, shard)
    cols = TEXT_COLUMNS[table.kind]
    trans = translations.filter(pl.col(LANG) == shard.lang).drop(LANG)
    df = rows
    for c in cols:
        renamed = trans.select(pl.col(TEXT).alias(c), pl.col(TRANSLATION).alias(f"{c}__t"),
                               *[pl.col(q).alias(f"{q}_{c}") for q in QE_COLUMNS])
        df = df.join(renamed, on=c, how="left")
    missing = df.filter(pl.any_horizontal([pl.col(f"{c}__t").is_null() for c in cols]))
    if missing.height:
        raise RuntimeError(f"shard {shard.name}: {missing.height} rows have no translation (pipeline lost rows)")
    reason = pl.concat_str(
        [pl.when(pl.col(f"{QE}_{c}") != "").then(pl.lit(f"{c}: ") + pl.col(f"{QE}_{c}")) for c in cols],
        separator="; ", ignore_nulls=True).fill_null("")
    df = df.with_columns(reason.alias(S.REASON))
    # canonical columns hold the translation; the English source moves to source_<col>
    df = df.with_columns(*[pl.col(c).alias(f"source_{c}") for c in cols]).with_columns(
        *[pl.col(f"{c}__t").alias(c) for c in cols]).drop([f"{c}__t" for c in cols])
    if table.kind == "scored_pairs":
        df = df.with_columns(pl.lit(shard.lang).alias(S.LANG1), pl.lit(shard.lang).alias(S.LANG2))
    else:
        df = df.with_columns(pl.lit(shard.lang).alias(S.LANG))
    meta = [pl.lit(table.kind).alias(KIND), pl.lit(source_name).alias(S.SOURCE), pl.lit(shard.lang).alias(TARGET_LANG)]
    df = df.with_columns(meta).sort(ROW_ID)
    kept = df.filter(pl.col(S.REASON) == "").drop(S.REASON)
    rejected = df.filter(pl.col(S.REASON) != "").with_columns(pl.lit(None, pl.String).alias(S.RAW))
    bad = bad.with_columns(meta).with_columns((pl.lit("malformed: ") + pl.col(S.REASON)).alias(S.REASON))
    quarantine = pl.concat([rejected, bad], how="diagonal_relaxed").sort(ROW_ID)
    return kept, quarantine


def load_synthesized_frame(data: pl.DataFrame, kind: str) -> pl.DataFrame:
    """Rows of one kind from a synthesize ``data`` output, canonical columns first."""
    df = data.filter(pl.col(KIND) == kind)
    canonical = list(S.KINDS[kind].names)
    rest = [c for c in df.columns if c not in canonical and df[c].null_count() < df.height]
    return df.select(canonical + rest)
