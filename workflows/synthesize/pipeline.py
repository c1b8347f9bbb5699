"""The synthesize pipeline: translate training pairs/triplets with vLLM on Ray Data, filter, shard, commit.

Flow (``run_synthesize``)::

    load inputs (driver, polars) -> plan shards (row range x language) -> skip committed shards
    -> unique (sentence, language) of the missing shards, in shard order -> Ray Data:
       PromptStage -> translation (vLLM; with qe.round_trip also back) -> EmbedStage
       (multilingual-e5-small) -> QEStage (text checks)
    -> streamed to the driver block by block; each shard whose sentences have all arrived is
       assembled (embedding checks within the shard) and committed at once by ShardedWriter
       (data + quarantine + parallel, then the shard marker)
    -> report -> manifest (counts per language, rows_in == kept + quarantined checked)

**Translation backend.** Two interchangeable stages produce the same columns:

* ``engine`` (default): ``map_batches(actors.translator.Translator, compute=ActorPoolStrategy)``,
  vLLM's ``LLM`` in the actor process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), per-row
  ``max_tokens``. Chosen as the default because it is the lighter of the two on CPU (one process
  per replica instead of an engine core process beside each actor: about 2.4 vs 3.9 GiB) and the
  model folder is resolved inside the worker (packaged names and ``s3://`` folders work on any
  node). Its throughput against ``ray_data_llm`` has not been measured yet
  (``benchmarks/synthesize.py --backends engine,ray_data_llm`` does it).
* ``ray_data_llm``: ``ray.data.llm.build_processor`` with ``vLLMEngineProcessorConfig`` (chat
  template, tokenize and detokenize stages off: prompts are built by ``PromptStage``), CPU via
  ``accelerator_type=None`` and a ``{"CPU": 1}`` placement group. The model path is resolved on
  the driver, so on a multi-node cluster it must be a hub id or a path every node has.

``benchmarks/synthesize.py`` measures both against raw ``vllm.LLM.generate``.

**Model honesty.** SmolLM2-135M-Instruct cannot translate: it answers in English or repeats the
source, and the QE filters reject nearly everything. Tests use it only because it is small: they
check the plumbing (sharding, resume, quarantine, S3), not translation quality. Gemma-3-270M
(base, two-example few-shot) is the default and the smallest model here that translates into
German and French; see the benchmark for its chrF.

**Resume.** Every shard is committed by its marker after its Parquet files; a rerun with the
same config redoes only the shards without a marker, and the manifest is written last. A
different config (``content_hash``) writing into the same output is refused.

**Batching choice.** All missing shards are translated in one streaming Ray Data pass (one
engine start, full batches). The sentences enter in shard order and the driver consumes blocks
as they finish, committing every shard as soon as all its sentences are back; so a run killed
halfway keeps the shards it committed, and a rerun translates only the sentences of the others.
The driver holds a sentence's translation (and embeddings) only while an uncommitted shard
needs it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import polars as pl
import pyarrow as pa

from embedforge import storage
from embedforge.errors import ConfigError, InputError
from embedforge.runtime import check_resources, init_ray, resolve_dtype_on_cluster
from workflows.synthesize import prompts as P
from workflows.synthesize import qe as Q
from workflows.synthesize import rows as R
from workflows.synthesize.config import SynthesizeConfig
from workflows.synthesize.report import build_report
from workflows.synthesize.stages import (GENERATED_TEXT, MAX_TOKENS, NUM_GENERATED_TOKENS, SOURCE_TOKENS, EmbedStage,
                                         PromptStage, QEStage, RoundTripTranslator, qe_batch)

log = logging.getLogger(__name__)

DATA, QUARANTINE, PARALLEL = "data", "quarantine", "parallel"


def translator_config(config: SynthesizeConfig) -> dict[str, Any]:
    # every engine field of the translation config reaches the engine (none is copied by hand)
    return {"engine": config.translation.engine_config().model_dump(mode="json"), "stop": ["\n"]}


def _translate_engine(ds, config: SynthesizeConfig):
    import ray.data

    from actors.translator import Translator

    t = config.translation
    if config.qe.round_trip:
        fn, kwargs = RoundTripTranslator, {"config": translator_config(config), "translation": t.model_dump(),
                                           "source_lang": config.source_lang}
    else:
        fn, kwargs = Translator, {"config": translator_config(config)}
    return ds.map_batches(
        fn, fn_constructor_kwargs=kwargs, batch_size=t.batch_size,
        compute=ray.data.ActorPoolStrategy(size=t.concurrency), num_cpus=t.num_cpus, num_gpus=t.num_gpus,
    )


def build_llm_processor(config: SynthesizeConfig):
    """``ray.data.llm`` processor: prompt + max_tokens in, generated_text + num_generated_tokens out."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from actors.llm_engine import LLMEngineConfig, engine_env
    from embedforge.models import resolve_model

    t = config.translation
    env = engine_env(LLMEngineConfig(kv_cache_gb=t.kv_cache_gb, in_process=False))
    on_gpu = t.num_gpus > 0
    proc_config = vLLMEngineProcessorConfig(
        model_source=resolve_model(t.model),
        engine_kwargs={"max_model_len": t.max_model_len, "dtype": t.dtype, "enforce_eager": t.enforce_eager,
                       "tensor_parallel_size": t.tensor_parallel_size, "gpu_memory_utilization": t.gpu_memory_utilization,
                       "seed": t.seed, "max_logprobs": t.max_logprobs},
        batch_size=t.batch_size, concurrency=t.concurrency, runtime_env={"env_vars": env},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        **({} if on_gpu else {"accelerator_type": None, "placement_group_config": {"bundles": [{"CPU": t.num_cpus}]}}),
    )
    keep = (R.TEXT, R.LANG, "max_tokens")
    return build_processor(
        proc_config,
        preprocess=lambda row: {**row, "sampling_params": {"temperature": 0.0, "max_tokens": int(row["max_tokens"]),
                                                          "stop": ["\n"]}},
        postprocess=lambda row: {**{k: row[k] for k in keep}, "generated_text": row["generated_text"],
                                 "num_generated_tokens": row["num_generated_tokens"]},
    )


def build_dataset(sentences: pl.DataFrame, config: SynthesizeConfig):
    """The Ray Data pipeline over unique (text, lang) rows (not yet executed); one row out per row in."""
    import ray.data

    t, qe = config.translation, config.qe
    blocks = max(1, min(64, sentences.height // max(1, t.batch_size)))
    ds = ray.data.from_arrow(sentences.to_arrow()).repartition(blocks)
    ds = ds.map_batches(PromptStage, fn_constructor_kwargs={"translation": t.model_dump(), "source_lang": config.source_lang},
                        batch_size=t.batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    ds = _translate_engine(ds, config) if t.backend == "engine" else build_llm_processor(config)(ds)
    if qe.cosine:
        embedder = {"model": qe.encoder, "prompt": qe.encoder_prompt, "batch_size": qe.encoder_batch_size,
                    "num_gpus": qe.encoder_num_gpus, "device": "cuda" if qe.encoder_num_gpus > 0 else "cpu"}
        ds = ds.map_batches(EmbedStage, fn_constructor_kwargs={"embedder": embedder}, batch_size=qe.encoder_batch_size,
                            compute=ray.data.ActorPoolStrategy(size=qe.encoder_concurrency), num_cpus=1,
                            num_gpus=qe.encoder_num_gpus)
    return ds.map_batches(QEStage, fn_constructor_kwargs={"qe": qe.model_dump(), "translation": t.model_dump()},
                          batch_size=256, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)


def iter_translated(sentences: pl.DataFrame, config: SynthesizeConfig, timeout_s: float = 600):
    """Run the pipeline, yielding each output block (a polars frame) as soon as it is computed."""
    import ray

    for bundle in build_dataset(sentences, config).iter_internal_ref_bundles():
        for entry in bundle.blocks:
            table = ray.get(entry.ref, timeout=timeout_s)
            if table.num_rows:
                yield pl.from_arrow(table)


def translate_and_score(sentences: pl.DataFrame, config: SynthesizeConfig) -> pl.DataFrame:
    """All translations at once (benchmarks); ``run_synthesize`` streams them instead."""
    parts = list(iter_translated(sentences, config))
    out = pl.concat(parts, how="diagonal_relaxed") if parts else empty_translations(config)
    if out.height != sentences.height:
        raise InputError(f"translation pipeline returned {out.height} rows for {sentences.height} sentences")
    return out


def empty_translations(config: SynthesizeConfig) -> pl.DataFrame:
    """A translation table with no rows and the QE stage's columns (shards with nothing to translate)."""
    empty = {R.TEXT: [], R.LANG: [], GENERATED_TEXT: [], NUM_GENERATED_TOKENS: [], MAX_TOKENS: [], SOURCE_TOKENS: []}
    return pl.from_arrow(qe_batch(empty, config.qe.model_dump(), count_tokens=lambda texts: []))


def _shard_keys(inputs: list[R.InputTable], shard: R.Shard) -> set[tuple[str, str]]:
    return {(text, lang) for text, lang in R.unique_sentences(inputs, [shard]).iter_rows()}


def _check_inputs(config: SynthesizeConfig, inputs: list[R.InputTable]) -> None:
    total = sum(t.num_rows for t in inputs)
    bad = sum(t.bad.height for t in inputs)
    if total == 0:
        raise InputError("the inputs hold no rows; check inputs[*].source and limit")
    if bad / total > config.max_bad_fraction:
        first = next(t.bad.row(0, named=True) for t in inputs if t.bad.height)
        raise InputError(f"{bad} of {total} input rows are malformed (more than max_bad_fraction="
                         f"{config.max_bad_fraction}); first: {first['reason']}. Fix the input or raise max_bad_fraction")


def _check_existing(writer: storage.ShardedWriter, chash: str) -> dict[str, dict[str, Any]]:
    done = writer.completed()
    foreign = sorted(n for n, m in done.items() if m.get("config_hash") != chash)
    if foreign:
        raise ConfigError(f"output {writer.prefix} holds shards of another config ({foreign[0]} ...); "
                          f"write to a new output or delete it (this config's hash is {chash})")
    return done


def _counts(shards: dict[str, dict[str, Any]], langs: list[str]) -> dict[str, dict[str, int]]:
    counts = {lang: {"rows_in": 0, "kept": 0, "quarantined": 0, "malformed": 0, "parallel_sentences": 0}
              for lang in langs}
    for meta in shards.values():
        for k in counts[meta["lang"]]:
            counts[meta["lang"]][k] += int(meta[k])
    for lang, c in counts.items():
        if c["rows_in"] != c["kept"] + c["quarantined"]:
            raise RuntimeError(f"{lang}: rows_in {c['rows_in']} != kept {c['kept']} + quarantined {c['quarantined']}")
    return counts


def _code_counts(quarantine: pl.DataFrame) -> dict[str, int]:
    """Quarantined rows per failure code (a row with two codes counts under both)."""
    if not quarantine.height:
        return {}
    codes = quarantine.select(R.reason_codes().list.unique().alias("code")).explode("code")["code"]
    return {str(k): int(v) for k, v in codes.value_counts().iter_rows()}


def _codes_by_lang(shards: dict[str, dict[str, Any]], langs: list[str]) -> dict[str, dict[str, int]]:
    """Per language, quarantined rows per failure code, summed over the committed shards."""
    out: dict[str, dict[str, int]] = {lang: {} for lang in langs}
    for meta in shards.values():
        for code, n in (meta.get("codes") or {}).items():
            out[meta["lang"]][code] = out[meta["lang"]].get(code, 0) + int(n)
    return out


def _read_sub(prefix: str, shards: dict[str, dict[str, Any]], sub: str) -> pl.DataFrame:
    tables = [storage.read_parquet(storage.join(prefix, m["files"][sub]["file"])) for _, m in sorted(shards.items())]
    return pl.from_arrow(pa.concat_tables(tables, promote_options="default"))


def run_synthesize(config: SynthesizeConfig) -> dict[str, Any]:
    """Translate, filter and commit; returns a summary with ``output`` and the manifest."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if config.translation.prompt_style == "few_shot":
        for lang in config.target_langs:
            try:
                P.few_shot_examples(lang, config.translation.few_shot)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    if config.qe.round_trip and config.translation.backend != "engine":
        raise ConfigError("qe.round_trip needs translation.backend=engine (it back-translates with the same engine "
                          "replica); set translation.backend=engine or qe.round_trip=false")
    chash = config.content_hash()
    writer = storage.ShardedWriter(config.output)
    if storage.is_committed(config.output):
        manifest = storage.read_manifest(config.output)
        if manifest.get("config_hash") != chash:
            raise ConfigError(f"output {config.output} is committed by another config (hash "
                              f"{manifest.get('config_hash')}, this one {chash}); use a new output")
        log.info("output %s is already complete for this config", config.output)
        return {"output": config.output, "manifest": manifest, "shards_written": [], "report": manifest.get("report")}
    done = _check_existing(writer, chash)

    inputs = [R.load_input(i, spec) for i, spec in enumerate(config.inputs)]
    _check_inputs(config, inputs)
    shards = R.plan_shards(inputs, config.target_langs, config.shard_rows)
    todo = [s for s in shards if s.name not in done]
    timings["load_s"] = time.perf_counter() - start
    log.info("%d shards planned, %d already committed, %d to do", len(shards), len(shards) - len(todo), len(todo))

    written, generated_tokens, n_unique, engine_dtype = [], 0, 0, None

    def commit(shard: R.Shard, translations: pl.DataFrame) -> None:
        table = inputs[shard.input_index]
        data, quarantine = R.assemble(table, shard, translations, config.inputs[shard.input_index].source, config.qe)
        rows_in = shard.end - shard.start
        meta = {"config_hash": chash, "lang": shard.lang, "input": table.name, "start": shard.start,
                "end": shard.end, "engine_dtype": engine_dtype, "rows_in": rows_in, "kept": data.height,
                "quarantined": quarantine.height,
                "malformed": int(quarantine.select(R.has_code(Q.MALFORMED)).to_series().sum()),
                "codes": _code_counts(quarantine)}
        if data.height + quarantine.height != rows_in:
            raise RuntimeError(f"shard {shard.name}: {data.height} kept + {quarantine.height} quarantined "
                               f"!= {rows_in} rows in")
        parallel = R.parallel_sentences(data, quarantine, table.kind)
        meta["parallel_sentences"] = parallel.height
        writer.write(shard.name, {DATA: data.to_arrow(), QUARANTINE: quarantine.to_arrow(),
                                  PARALLEL: parallel.to_arrow()}, meta)
        written.append(shard.name)
        log.info("committed shard %s: %d kept, %d quarantined, %d parallel sentences", shard.name, data.height,
                 quarantine.height, parallel.height)

    if todo:
        sentences = R.unique_sentences(inputs, todo)
        n_unique = sentences.height
        needs = {s.name: _shard_keys(inputs, s) for s in todo}
        waiting = [s for s in todo if needs[s.name]]
        t0 = time.perf_counter()
        for shard in todo:  # nothing to translate (every row malformed): commit at once
            if not needs[shard.name]:
                commit(shard, empty_translations(config))
        if waiting:
            init_ray(config.ray)
            t = config.translation
            check_resources(t.num_cpus, t.num_gpus, "translation.num_gpus", config.ray.fail_fast_on_missing_gpus)
            check_resources(1, config.qe.encoder_num_gpus, "qe.encoder_num_gpus", config.ray.fail_fast_on_missing_gpus)
            engine_dtype = resolve_dtype_on_cluster(t.dtype, t.num_cpus, t.num_gpus)
            run_config = config.model_copy(update={"translation": t.model_copy(update={"dtype": engine_dtype})})
            held, arrived, n_out = None, set(), 0
            for block in iter_translated(sentences, run_config):
                n_out += block.height
                generated_tokens += int(block[NUM_GENERATED_TOKENS].sum())
                held = block if held is None else pl.concat([held, block], how="diagonal_relaxed")
                arrived.update(block.select(R.TEXT, R.LANG).iter_rows())
                ready = [s for s in waiting if needs[s.name] <= arrived]
                for shard in ready:
                    commit(shard, held)
                if ready:
                    waiting = [s for s in waiting if s not in ready]
                    still = set().union(*(needs[s.name] for s in waiting)) if waiting else set()
                    keep = [(text, lang) in still for text, lang in held.select(R.TEXT, R.LANG).iter_rows()]
                    held = held.filter(pl.Series(keep, dtype=pl.Boolean))
            if waiting or n_out != n_unique:
                raise InputError(f"translation pipeline returned {n_out} rows for {n_unique} sentences; "
                                 f"{len(waiting)} shards left uncommitted")
        timings["translate_and_write_s"] = time.perf_counter() - t0

    committed = _check_existing(writer, chash)
    counts = _counts(committed, config.target_langs)
    for lang, c in counts.items():
        if c["rows_in"] and c["quarantined"] / c["rows_in"] > config.max_rejected_fraction:
            raise InputError(f"{lang}: {c['quarantined']} of {c['rows_in']} rows quarantined (more than "
                             f"max_rejected_fraction={config.max_rejected_fraction}); see {config.output}/quarantine")
    t0 = time.perf_counter()
    report = build_report(_read_sub(config.output, committed, DATA), _read_sub(config.output, committed, QUARANTINE),
                          config.output, config.target_langs)
    timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    manifest = writer.finish({
        "kind": "synthesize", "config_hash": chash, "model": config.translation.model,
        "target_langs": config.target_langs, "inputs": [s.model_dump(mode="json") for s in config.inputs],
        "engine_dtype": sorted({m.get("engine_dtype") or "unknown" for m in committed.values()}),
        "counts": counts, "quarantine_codes": _codes_by_lang(committed, config.target_langs), "unique_sentences_translated": n_unique, "generated_tokens": generated_tokens,
        "shards_written_this_run": written, "timings": timings, "report": report["files"],
        "config": config.model_dump(mode="json"),
    })
    return {"output": config.output, "manifest": manifest, "shards_written": written, "report": report}


def load_synthesized(output: str, kind: str) -> pl.DataFrame:
    """The kept rows of one kind (scored_pairs or nli_triplets) of a committed synthesize output."""
    return R.load_synthesized_frame(pl.from_arrow(storage.read_output(output, DATA)), kind)
