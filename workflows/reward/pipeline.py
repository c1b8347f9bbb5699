"""``run_reward(config)``: mine hard negatives, score them with LLM feedback, score STS pairs.

Output prefix (committed by ``_MANIFEST.json``, see :class:`embedforge.storage.ShardedWriter`)::

    candidates/mining.parquet      qid, doc_id, rank, similarity, is_positive (rank 0 = gold)
    feedback/feedback-NNNNN.parquet  qid, question, answer, doc_id, passage, is_positive, rank, similarity,
                                     reward, n_answer_tokens, teacher_prob  (softmax(reward / T) per qid)
    sts_eval/sts_eval-NNNNN.parquet  dev pairs: sentence1, sentence2, score (gold), teacher_score, score_mass
    sts_teacher/sts_teacher-NNNNN.parquet  input pairs + teacher_score, score_mass (gold score kept)
    quarantine/<shard>.parquet     stage, reason, raw (the row as JSON)
    report/                        reward_distribution.png, teacher_vs_gold.png, summary.json

Every shard is committed by its marker, so a rerun redoes only unfinished shards; scoring runs
once per task through Ray Data (``map_batches(RewardScorer, compute=ActorPoolStrategy)``) and
shards are written as soon as all their rows have come back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import defaultdict
from typing import Any

import polars as pl
import pyarrow as pa

from actors.reward_scorer import (
    PASSAGE_COLUMN,
    QUERY_COLUMN,
    REWARD,
    TEACHER_SCORE,
    CrossEncoderPromptConfig,
    FeedbackPromptConfig,
    RewardScorer,
    prompt_config,
)
from embedforge import schemas as S
from embedforge import storage
from embedforge.data.spec import DatasetSpec, is_uri, load_dataset
from embedforge.data.table import load_table
from embedforge.errors import ConfigError, InputError
from embedforge.runtime import check_resources, init_ray
from workflows.reward.config import RewardConfig
from workflows.reward.mining import RANK, SIMILARITY, mine_hard_negatives
from workflows.reward.report import write_report
from workflows.reward.scoring import spearman, teacher_distribution

log = logging.getLogger(__name__)

IS_POSITIVE, TEACHER_PROB, STAGE = "is_positive", "teacher_prob", "stage"
CONFIG_HASH = "config_hash"
_SHARD = "_shard"
QUARANTINE_SCHEMA = pa.schema([(STAGE, pa.string()), (S.REASON, pa.string()), (S.RAW, pa.string())])


# ---------------------------------------------------------------- inputs


def quarantine_rows(df: pl.DataFrame, stage: str) -> pa.Table:
    """Rows with a non-empty ``reason`` as (stage, reason, raw JSON)."""
    if df.height == 0:
        return QUARANTINE_SCHEMA.empty_table()
    raws = [json.dumps({k: v for k, v in r.items() if k not in (S.REASON, _SHARD)}, default=str, ensure_ascii=False)
            for r in df.iter_rows(named=True)]
    return pa.table({STAGE: [stage] * df.height, S.REASON: df[S.REASON].to_list(), S.RAW: raws},
                    schema=QUARANTINE_SCHEMA)


def load_rows(spec: DatasetSpec, kind: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(rows, bad)`` of a dataset: a named source, a Parquet/JSONL file, or a committed output prefix.

    A committed prefix (e.g. the synthesize output) is read from its ``data`` output with every
    column kept; Parquet/JSONL files are checked row by row (bad rows come back with a reason).
    """
    empty_bad = pl.DataFrame(schema={S.LINE: pl.Int64, S.REASON: pl.String, S.RAW: pl.String})
    source = spec.source
    if is_uri(source) and storage.is_committed(source):
        df = pl.from_arrow(storage.read_output(source, "data"))
        S.require_columns(df.columns, S.KINDS[kind].names, f"{source} (data output)")
        if kind == "scored_pairs":  # an output may mix kinds (e.g. NLI shards): keep the scored pairs
            other = df.filter(pl.col(S.SCORE).is_null()).height
            if other:
                log.info("%s: skipping %d rows without a gold score (other kinds)", source, other)
            df = df.filter(pl.col(S.SCORE).is_not_null())
        return (df.head(spec.limit) if spec.limit else df), empty_bad
    if is_uri(source):
        res = load_table(source, kind)
        return (res.rows.head(spec.limit) if spec.limit else res.rows), res.bad
    df = load_dataset(spec)
    if not isinstance(df, pl.DataFrame):
        raise InputError(f"{source}: expected a {kind} table, got {type(df).__name__}")
    S.require_columns(df.columns, S.KINDS[kind].names, source)
    return df, empty_bad


def doc_id_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- scoring through Ray Data


def score_shards(rows: pl.DataFrame, task: str, config: RewardConfig, writer: storage.ShardedWriter, sub: str,
                 stage: str, finalize=None) -> None:
    """Score ``rows`` (with a ``_shard`` column) in one Ray Data run; write each shard once complete."""
    import ray

    todo = rows.filter(~pl.col(_SHARD).is_in([s for s in rows[_SHARD].unique().to_list() if writer.done(s)]))
    if todo.height == 0:
        return
    sc = config.scorer
    check_resources(sc.engine.num_cpus, sc.engine.num_gpus, "scorer.engine", config.ray.fail_fast_on_missing_gpus)
    bs = config.llm_feedback.batch_size if task == "feedback" else config.cross_encoder.batch_size
    table = todo.to_arrow()
    blocks = [table.slice(i, bs) for i in range(0, table.num_rows, bs)]
    ds = ray.data.from_arrow(blocks).map_batches(
        RewardScorer,
        # the scorer takes its own prompt configs, not the workflow's extensions of them
        fn_constructor_kwargs={"engine": sc.engine, "task": task,
                               "feedback": prompt_config(FeedbackPromptConfig, config.llm_feedback),
                               "cross_encoder": prompt_config(CrossEncoderPromptConfig, config.cross_encoder)},
        compute=ray.data.ActorPoolStrategy(size=sc.num_actors),
        batch_size=bs,
        batch_format="numpy",
        num_cpus=sc.engine.num_cpus,
        num_gpus=sc.engine.num_gpus,
    )
    need = dict(todo.group_by(_SHARD).len().iter_rows())
    pending: dict[str, list[pl.DataFrame]] = defaultdict(list)
    have: dict[str, int] = defaultdict(int)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        df = pl.from_arrow(batch)
        for (shard,), part in df.partition_by(_SHARD, as_dict=True).items():
            pending[shard].append(part)
            have[shard] += part.height
            if have[shard] == need[shard]:
                _write_shard(writer, shard, pl.concat(pending.pop(shard)), sub, stage, finalize, config.content_hash())


def _write_shard(writer, shard: str, df: pl.DataFrame, sub: str, stage: str, finalize, chash: str) -> None:
    bad = df.filter(pl.col(S.REASON) != "")
    good = df.filter(pl.col(S.REASON) == "").drop(S.REASON, _SHARD)
    if finalize is not None:
        good = finalize(good)
    writer.write(shard, {sub: good.to_arrow(), "quarantine": quarantine_rows(bad, stage)},
                 {"rows": good.height, "quarantined": bad.height, CONFIG_HASH: chash})
    log.info("shard %s: %d rows, %d quarantined", shard, good.height, bad.height)


def read_sub(writer: storage.ShardedWriter, sub: str) -> pl.DataFrame | None:
    """Concatenate one sub-output over the completed shards (before the manifest is committed)."""
    tables = [storage.read_parquet(storage.join(writer.prefix, rec["files"][sub]["file"]))
              for _, rec in sorted(writer.completed().items()) if sub in rec["files"]]
    return pl.from_arrow(pa.concat_tables(tables, promote_options="default")) if tables else None


# ---------------------------------------------------------------- stages


def run_feedback(config: RewardConfig, writer: storage.ShardedWriter) -> dict[str, Any]:
    """Mine candidates for each question, then reward every (question, candidate) pair."""
    fb = config.llm_feedback
    qa, bad = load_rows(fb.data, "qa")
    if bad.height:
        writer.write("feedback-input", {"quarantine": quarantine_rows(bad.select(S.REASON, S.RAW), "llm_feedback")},
                     {"rows": 0, "quarantined": bad.height, CONFIG_HASH: config.content_hash()})
    if qa.height == 0:
        raise InputError(f"llm_feedback.data {fb.data.source!r}: no rows to score")
    qa = qa.with_columns(pl.col(S.CONTEXT).map_elements(doc_id_of, return_dtype=pl.String).alias(S.DOC_ID))
    if writer.done("mining"):
        candidates = read_sub(writer, "candidates")
    else:
        corpus = qa.select(S.DOC_ID, pl.col(S.CONTEXT).alias("text")).unique(S.DOC_ID, maintain_order=True)
        queries = qa.select(S.QID, pl.col(S.QUESTION).alias("text"))
        positives = {q: {d} for q, d in qa.select(S.QID, S.DOC_ID).iter_rows()}
        negatives, pos_sim = mine_hard_negatives(queries, corpus, positives, config.mining)
        gold = qa.select(S.QID, S.DOC_ID).with_columns(
            pl.lit(0, pl.Int32).alias(RANK),
            pl.col(S.QID).replace_strict(pos_sim, default=None, return_dtype=pl.Float32).alias(SIMILARITY))
        candidates = pl.concat([gold.with_columns(pl.lit(True).alias(IS_POSITIVE)),
                                negatives.with_columns(pl.lit(False).alias(IS_POSITIVE))])
        writer.write("mining", {"candidates": candidates.to_arrow()},
                     {"rows": candidates.height, CONFIG_HASH: config.content_hash()})
    passages = qa.select(S.DOC_ID, pl.col(S.CONTEXT).alias(PASSAGE_COLUMN)).unique(S.DOC_ID)
    order = {q: i for i, q in enumerate(qa[S.QID].to_list())}
    pairs = (candidates.join(qa.select(S.QID, S.QUESTION, S.ANSWER), on=S.QID)
             .join(passages, on=S.DOC_ID)
             .with_columns(pl.col(S.QUESTION).alias(QUERY_COLUMN),
                           (pl.col(S.QID).replace_strict(order, return_dtype=pl.Int64) // fb.shard_queries)
                           .map_elements(lambda i: f"feedback-{i:05d}", return_dtype=pl.String).alias(_SHARD))
             .sort(S.QID, RANK))
    score_shards(pairs, "feedback", config, writer, "feedback", "llm_feedback",
                 finalize=lambda df: teacher_distribution(df.drop(QUERY_COLUMN), fb.temperature))
    return feedback_metrics(read_sub(writer, "feedback"))


def feedback_metrics(df: pl.DataFrame | None) -> dict[str, Any]:
    """Teacher agreement: share of questions whose gold paragraph gets the highest reward."""
    if df is None or df.height == 0:
        return {"pairs": 0, "queries": 0}
    best = df.sort(REWARD, descending=True).group_by(S.QID, maintain_order=True).first()
    with_gold = df.filter(pl.col(IS_POSITIVE))[S.QID].unique()
    best = best.filter(pl.col(S.QID).is_in(with_gold.implode()))
    pos, neg = df.filter(pl.col(IS_POSITIVE))[REWARD], df.filter(~pl.col(IS_POSITIVE))[REWARD]
    return {
        "pairs": df.height,
        "queries": df[S.QID].n_unique(),
        "gold_top1": float(best[IS_POSITIVE].mean()) if best.height else math.nan,
        "mean_reward_gold": float(pos.mean()) if pos.len() else math.nan,
        "mean_reward_negative": float(neg.mean()) if neg.len() else math.nan,
    }


def _pairs_with_shards(df: pl.DataFrame, prefix: str, size: int) -> pl.DataFrame:
    return df.with_row_index("_i").with_columns(
        (pl.col("_i") // size).map_elements(lambda i: f"{prefix}-{i:05d}", return_dtype=pl.String).alias(_SHARD)
    ).drop("_i")


def run_cross_encoder(config: RewardConfig, writer: storage.ShardedWriter) -> dict[str, Any]:
    """Spearman on the eval pairs; teacher_score added to ``pairs`` (gold score kept)."""
    ce = config.cross_encoder
    out: dict[str, Any] = {}
    jobs = [(name, spec) for name, spec in (("sts_eval", ce.eval_data), ("sts_teacher", ce.pairs)) if spec]
    for name, spec in jobs:
        rows, bad = load_rows(spec, "scored_pairs")
        if bad.height:
            writer.write(f"{name}-input", {"quarantine": quarantine_rows(bad.select(S.REASON, S.RAW), name)},
                         {"rows": 0, "quarantined": bad.height, CONFIG_HASH: config.content_hash()})
        score_shards(_pairs_with_shards(rows, name, ce.shard_pairs), "cross_encoder", config, writer, name, name)
        scored = read_sub(writer, name)
        n = 0 if scored is None else scored.height
        out[name] = {"pairs": n}
        if n:
            out[name]["spearman"] = spearman(scored[S.SCORE].to_list(), scored[TEACHER_SCORE].to_list())
            out[name]["mean_score_mass"] = float(scored["score_mass"].mean())
    return out


# ---------------------------------------------------------------- entry


def quarantine_counts(writer: storage.ShardedWriter) -> tuple[int, int]:
    rows = bad = 0
    for rec in writer.completed().values():
        if "candidates" in rec["files"]:
            continue
        rows += int(rec.get("rows", 0))
        bad += int(rec.get("quarantined", 0))
    return rows, bad


def check_existing(config: RewardConfig) -> dict[str, Any] | None:
    """The manifest when ``config.output`` is committed by this config (skip), None when there is
    nothing to reuse; ConfigError when the output or any of its shards was written by another
    config (its rows would be returned as this config's)."""
    chash = config.content_hash()
    if storage.is_committed(config.output):
        manifest = storage.read_manifest(config.output)
        if manifest.get(CONFIG_HASH) != chash:
            raise ConfigError(f"output {config.output} is committed by another reward config (hash "
                              f"{manifest.get(CONFIG_HASH)}, this one {chash}); write to a new output or set "
                              "overwrite=true to recompute")
        return manifest
    foreign = sorted(n for n, m in storage.ShardedWriter(config.output).completed().items()
                     if m.get(CONFIG_HASH) != chash)
    if foreign:
        raise ConfigError(f"output {config.output} holds shards of another reward config ({foreign[0]} ...); "
                          f"write to a new output or set overwrite=true (this config's hash is {chash})")
    return None


def run_reward(config: RewardConfig) -> dict[str, Any]:
    """Run the enabled stages, commit the output, write the report; return the summary.

    A committed output of the same config (``content_hash``) is returned as it is; one of another
    config, or shards of another config, are refused (ConfigError) unless ``overwrite`` is set.
    """
    if config.overwrite:
        storage.uncommit(config.output)
    manifest = check_existing(config)
    if manifest is not None:
        log.info("%s is already committed by this config; set overwrite=true to recompute", config.output)
        return {"output": config.output, "manifest": manifest, "skipped": True, **manifest.get("summary", {})}
    init_ray(config.ray)
    writer = storage.ShardedWriter(config.output)
    summary: dict[str, Any] = {"output": config.output}
    if config.llm_feedback.enabled:
        summary["llm_feedback"] = run_feedback(config, writer)
    if config.cross_encoder.enabled:
        summary["cross_encoder"] = run_cross_encoder(config, writer)
    rows, bad = quarantine_counts(writer)
    summary["rows"], summary["quarantined"] = rows, bad
    if rows + bad and bad / (rows + bad) > config.max_bad_fraction:
        raise InputError(f"{bad} of {rows + bad} rows were quarantined (more than max_bad_fraction="
                         f"{config.max_bad_fraction}); see {storage.join(config.output, 'quarantine')} "
                         "(output not committed)")
    if config.report:
        eval_df = read_sub(writer, "sts_eval") if config.cross_encoder.eval_data else None
        if eval_df is None and config.cross_encoder.pairs:
            eval_df = read_sub(writer, "sts_teacher")
        rho = summary.get("cross_encoder", {}).get("sts_eval", {}).get("spearman")
        summary["report"] = write_report(config.output, read_sub(writer, "feedback"), eval_df, rho, summary)
    manifest = writer.finish({"kind": "reward", "config": config.model_dump(mode="json"),
                              CONFIG_HASH: config.content_hash(), "rows": rows, "quarantined": bad,
                              "summary": {k: v for k, v in summary.items() if k != "output"}})
    summary["manifest"] = manifest
    return summary
