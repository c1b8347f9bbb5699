"""Synthesize stage: pure prompt/QE/row logic first, then the real Ray Data + vLLM pipeline on CPU.

The end-to-end tests use SmolLM2-135M-Instruct because it is small; it cannot translate, so
they check the plumbing (shards, quarantine, resume, S3, counts), not translation quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from embedforge import storage
from embedforge.config import build_config, load_config
from embedforge.errors import ConfigError
from workflows.synthesize import prompts as P
from workflows.synthesize import qe as Q
from workflows.synthesize import rows as R
from workflows.synthesize.config import QEConfig, SynthesizeConfig
from workflows.synthesize.report import summarize
from workflows.synthesize.stages import PromptStage, qe_batch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "synthesize.yaml"


def _config(**kw) -> SynthesizeConfig:
    data = {"inputs": [{"source": "stsb", "split": "train", "limit": 4}], "target_langs": ["de"], "output": "/tmp/x"}
    data.update(kw)
    return build_config(SynthesizeConfig, data)


# ------------------------------------------------------------------ config and CLI


def test_example_config_validates():
    config = load_config(SynthesizeConfig, EXAMPLE)
    assert config.translation.model == "gemma-3-270m"
    assert config.target_langs == ["de"]


def test_config_rejects_test_split_and_bad_kinds():
    with pytest.raises(ConfigError, match="test splits are for final evaluation"):
        _config(inputs=[{"source": "stsb", "split": "test"}])
    with pytest.raises(ConfigError, match="translate one of scored_pairs, nli_triplets"):
        _config(inputs=[{"source": "gsm8k", "split": "train"}])
    with pytest.raises(ConfigError, match="ISO 639-1"):
        _config(target_langs=["German"])
    with pytest.raises(ConfigError, match="min_length_ratio"):
        _config(qe={"min_length_ratio": 3.0, "max_length_ratio": 2.0})


def test_content_hash_ignores_scale_fields():
    a = _config()
    b = _config(translation={"concurrency": 4, "batch_size": 8, "num_gpus": 1}, ray={"num_cpus": 8})
    c = _config(translation={"max_tokens_factor": 3.0})
    assert a.content_hash() == b.content_hash() != c.content_hash()


def test_job_dry_run_and_bad_config(capsys, tmp_path):
    from jobs.synthesize import main

    assert main(["--config", str(EXAMPLE), "--dry-run"]) == 0
    assert "SynthesizeConfig" in capsys.readouterr().out
    assert main(["--config", str(EXAMPLE), "--set", "translation.backend=hf", "--dry-run"]) == 2
    assert "translation.backend" in capsys.readouterr().err


# ------------------------------------------------------------------ prompts


def test_few_shot_prompt_and_examples_come_from_train_data():
    prompt = P.few_shot_prompt("A dog runs.", "de", P.few_shot_examples("de"))
    assert prompt.endswith("English: A dog runs.\nGerman:")
    assert prompt.count("English: ") == 3
    from embedforge.data import data_root

    folder = Path(data_root()) / "stsb_multi_mt"
    if not folder.is_dir():
        pytest.skip("shared data folder not present")
    for lang, examples in P.BUILTIN_FEW_SHOT.items():
        train = (folder / f"stsb-{lang}-train.csv").read_text()
        for test_split in ("dev", "test"):
            other = (folder / f"stsb-{lang}-{test_split}.csv").read_text()
            assert not any(t in other for _, t in examples), (lang, test_split)
        assert all(t in train for _, t in examples), lang
    en_train = (folder / "stsb-en-train.csv").read_text()
    assert all(s in en_train for s, _ in P.BUILTIN_FEW_SHOT["de"])


def test_few_shot_missing_language_names_the_fix():
    with pytest.raises(ValueError, match="translation.few_shot.hi"):
        P.few_shot_examples("hi")
    own = P.few_shot_examples("hi", {"hi": [("A cat.", "एक बिल्ली।")]})
    assert own == [("A cat.", "एक बिल्ली।")]


def test_chat_messages_max_tokens_and_cleaning():
    msgs = P.chat_messages("A dog runs.", "fr")
    assert msgs[0]["role"] == "user" and "French" in msgs[0]["content"] and "A dog runs." in msgs[0]["content"]
    assert P.max_tokens_for(10, 2.0, 16) == 36
    assert P.max_tokens_for(0, 2.0, 16) == 16
    assert P.clean_completion(" Ein Hund läuft.\nEnglish: x") == "Ein Hund läuft."


def test_prompt_stage_chat_template(smollm_path):
    from workflows.synthesize.stages import PromptStage

    stage = PromptStage({"model": smollm_path, "prompt_style": "auto"})
    assert stage.style == "chat"
    out = stage({"text": ["A man plays a guitar."], "lang": ["de"]})
    assert "<|im_start|>assistant" in out["prompt"][0] and "German" in out["prompt"][0]
    assert out["max_tokens"][0] == P.max_tokens_for(out["num_source_tokens"][0], 2.0, 16)


# ------------------------------------------------------------------ QE: one test per rejection reason

QE = QEConfig()
SRC = "A man is playing a guitar on the stage."
GOOD = "Ein Mann spielt auf der Bühne Gitarre."


def _failures(translation, tokens=10, max_tokens=40, source=SRC, lang="de", qe=QE, **kw):
    return Q.text_checks(source, translation, lang, tokens, max_tokens, qe, **kw)["failures"]


def _codes(translation, **kw):
    return [f.code for f in _failures(translation, **kw)]


def test_qe_good_translation_passes():
    assert _codes(GOOD) == []


def test_qe_empty():
    assert _codes("   ") == [Q.EMPTY]


def test_qe_runaway_by_limit_and_by_repetition():
    assert Q.RUNAWAY in _codes(GOOD, tokens=40, max_tokens=40)
    looped = "Ein Mann spielt Gitarre und ein Mann spielt Gitarre und ein Mann spielt Gitarre"
    fail = Q.check_runaway(looped, 10, 40, 3)
    assert (fail.code, fail.value, fail.threshold) == (Q.RUNAWAY, 3.0, 3.0)


def test_qe_copy():
    assert Q.COPY in _codes("A man is playing a guitar on the stage!")


def test_qe_length_ratio_in_chars_and_tokens():
    chars = QEConfig(length_unit="chars")
    [fail] = _failures("Ein Mann spielt.", qe=chars)
    assert fail.code == Q.LENGTH_RATIO and fail.threshold == chars.min_length_ratio
    assert fail.value == pytest.approx(len("Ein Mann spielt.") / len(SRC))
    long = GOOD + " Er trägt einen blauen Hut und eine rote Jacke, und das Publikum klatscht laut."
    assert Q.LENGTH_RATIO in _codes(long, qe=chars)
    assert Q.LENGTH_RATIO in _codes(GOOD, source_length=10, translation_length=3)


def test_qe_length_in_tokens_keeps_a_correct_chinese_translation():
    """A correct Chinese translation has about a third of the English characters but as many tokens."""
    src, zh = "A man is playing a guitar.", "一个男人在弹吉他。"
    chars = QEConfig(length_unit="chars", langid_candidates=["zh", "en", "de"])
    assert Q.LENGTH_RATIO in _codes(zh, source=src, lang="zh", qe=chars)
    tokens = QEConfig(langid_candidates=["zh", "en", "de"])
    assert _codes(zh, source=src, lang="zh", qe=tokens, source_length=7, translation_length=6) == []


def test_qe_language():
    [fail] = _failures("Un homme joue de la guitare sur scène.")
    assert fail.code == Q.LANGUAGE and "detected fr" in fail.detail


def test_qe_round_trip():
    assert Q.round_trip_chrf(SRC, SRC) == pytest.approx(100.0)
    assert Q.ROUND_TRIP in _codes(GOOD, back_chrf=Q.round_trip_chrf(SRC, "A woman eats an apple."))
    assert _codes(GOOD, back_chrf=Q.round_trip_chrf(SRC, "A man plays the guitar on the stage.")) == []


def test_qe_cosine_floor():
    fail = Q.check_cosine(0.5, 0.8)
    assert (fail.code, fail.value, fail.threshold) == (Q.COSINE, 0.5, 0.8)
    assert Q.check_cosine(None, 0.8) is None and Q.check_cosine(0.9, 0.8) is None


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_ratio_margin_is_laser_formula():
    """cos(x_i, y_i) / ((mean top-k cos of x_i over targets + mean top-k cos of y_i over sources) / 2)."""
    rng = np.random.default_rng(0)
    x, y = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
    got = Q.ratio_margin(x.astype(np.float32), y.astype(np.float32), k=3)
    sims = x @ y.T
    for i in range(6):
        fwd = np.mean(sorted(sims[i], reverse=True)[:3])
        bwd = np.mean(sorted(sims[:, i], reverse=True)[:3])
        assert got[i] == pytest.approx(sims[i, i] / ((fwd + bwd) / 2), rel=1e-5)
    # k above the pool size: every row is a neighbour (LASER's min(k, n))
    assert np.allclose(Q.ratio_margin(x, y, k=50), Q.ratio_margin(x, y, k=6))
    assert Q.ratio_margin(np.zeros((0, 5)), np.zeros((0, 5)), 4).shape == (0,)


def test_margin_catches_a_wrong_translation_that_cosine_keeps():
    """Fake embeddings where every cosine is high (as with e5), one translation about something else.

    Each source i and its right translation share topic direction i; the wrong translation (row 0)
    points at topic 1 instead. Its cosine to its source stays high because all share a common
    component, but its margin falls below 1: its own source is not its nearest neighbour.
    """
    common, topics = np.ones(8), np.eye(8)
    src = _unit([common * 2.5 + topics[i] for i in range(8)])
    tgt = _unit([common * 2.5 + topics[i] * 0.9 for i in range(8)])
    tgt[0] = _unit(common * 2.5 + topics[1] * 0.9)
    cos = np.sum(src * tgt, axis=1)
    assert cos[0] > 0.85  # the bare cosine check (min_cosine 0.8) keeps it
    margin = Q.ratio_margin(src, tgt, k=4)
    assert margin[0] < 1.0 <= margin[2:].min()
    fail = Q.check_margin(float(margin[0]), 1.0)
    assert fail.code == Q.MARGIN and fail.threshold == 1.0


def test_pair_consistency():
    assert Q.check_pair_consistency(0.95, 0.9, 0.1) is None
    fail = Q.check_pair_consistency(0.95, 0.7, 0.1)
    assert (fail.code, fail.value, fail.threshold) == (Q.PAIR_CONSISTENCY, pytest.approx(0.25), 0.1)
    assert Q.check_pair_consistency(0.6, 0.8, 0.1).code == Q.PAIR_CONSISTENCY  # too similar after translation too


def test_qe_batch_stage_on_a_dict():
    out = pl.from_arrow(qe_batch(
        {"text": [SRC, SRC], "lang": ["de", "de"], "generated_text": [" " + GOOD + "\n", ""],
         "num_generated_tokens": [10, 0], "max_tokens": [40, 40], "num_source_tokens": [10, 10]},
        QE.model_dump(), count_tokens=lambda texts: [len(t.split()) + 3 for t in texts]))
    assert out["translation"].to_list() == [GOOD, ""]
    assert out["qe"].to_list()[0] == []
    assert out["qe"].to_list()[1] == [{"code": "empty", "detail": "no text", "value": None, "threshold": None}]
    with pytest.raises(Exception, match="missing columns"):
        qe_batch({"text": [SRC]}, QE.model_dump())
    with pytest.raises(ValueError, match="length_unit=chars"):
        qe_batch({"text": [SRC], "lang": ["de"], "generated_text": [GOOD], "num_generated_tokens": [10],
                  "max_tokens": [40]}, QE.model_dump())


def test_back_prompt_reverses_the_few_shot_examples():
    stage = object.__new__(PromptStage)  # no tokenizer needed for few-shot prompts
    stage.style, stage.source_lang = "few_shot", "en"
    stage.config = SynthesizeConfig.model_fields["translation"].default
    prompt = stage.back_prompt("Ein Hund läuft.", "de")
    assert prompt.endswith("German: Ein Hund läuft.\nEnglish:")
    assert "German: Ein Mann streicht geriebenen Käse auf eine Pizza.\nEnglish: A man is spreading" in prompt


# ------------------------------------------------------------------ rows (pure)


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _pairs(n: int) -> list[dict]:
    return [{"sentence1": f"A man number {i} plays.", "sentence2": f"A woman number {i} sings.",
             "score": 0.5, "lang1": "en", "lang2": "en"} for i in range(n)]


def test_malformed_rows_go_to_bad_with_structured_reasons(tmp_path):
    rows = _pairs(3) + [{"sentence1": "", "sentence2": " ", "score": 0.1, "lang1": "en", "lang2": "en"},
                        {"sentence1": None, "sentence2": "x", "score": 0.1, "lang1": "en", "lang2": "en"}]
    uri = _jsonl(tmp_path / "pairs.jsonl", rows)
    config = _config(inputs=[{"source": uri, "kind": "scored_pairs"}])
    table = R.load_input(0, config.inputs[0])
    assert table.rows.height == 3 and table.num_rows == 5
    # the file checker (embedforge.data) names the line; the record as a whole is malformed
    assert table.bad["row_id"].to_list() == [3, 4] and table.bad["bad_column"].null_count() == 2
    assert table.bad["reason"][0].startswith("line 4: ")
    shard = R.plan_shards([table], ["de"], 10)[0]
    _, quarantine = R.assemble(table, shard, _fake_translations(R.unique_sentences([table], [shard])), "x")
    assert quarantine["row_id"].to_list() == [3, 4]
    assert [(f["code"], f["column"]) for fs in quarantine["reasons"].to_list() for f in fs] == [
        ("malformed", "row"), ("malformed", "row")]
    # named datasets: blank or null sentences found per column
    df = pl.DataFrame({"sentence1": ["a", "", None], "sentence2": ["b", " ", "c"], "score": [0.1] * 3,
                       "lang1": ["en"] * 3, "lang2": ["en"] * 3})
    assert R.malformed(df, "scored_pairs") == [[], [("sentence1", "empty text"), ("sentence2", "empty text")],
                                               [("sentence1", "null")]]


def _fake_translations(sentences: pl.DataFrame, fail: dict[str, dict] | None = None, emb: dict | None = None
                       ) -> pl.DataFrame:
    """A translation table as the QE stage returns it ("DE " + text), failures and embeddings given per text."""
    fail = fail or {}
    texts = sentences["text"].to_list()
    df = sentences.with_columns(
        pl.concat_str([pl.lit("DE "), pl.col("text")]).alias("translation"), pl.lit("de").alias("detected_lang"),
        pl.lit(0.99).alias("lang_prob"), pl.lit(1.0).alias("length_ratio"),
        pl.lit(None, pl.Float64).alias("round_trip_chrf"),
        pl.Series("qe", [[fail[t]] if t in fail else [] for t in texts], dtype=Q.failure_dtype(with_column=False)))
    if emb:
        src = np.stack([emb[t][0] for t in texts]).astype(np.float32)
        tgt = np.stack([emb[t][1] for t in texts]).astype(np.float32)
        df = df.with_columns(pl.Series("cosine", np.sum(src * tgt, axis=1), dtype=pl.Float64),
                             pl.Series("source_embedding", src), pl.Series("translation_embedding", tgt))
    return df


def test_unique_sentences_and_assemble():
    rows = pl.DataFrame({"anchor": ["P", "P", "Q"], "positive": ["e1", "e2", "e3"], "negative": ["c1", "c2", "c3"],
                         "lang": ["en"] * 3}).with_row_index(R.ROW_ID).with_columns(pl.col(R.ROW_ID).cast(pl.Int64))
    bad = pl.DataFrame({R.ROW_ID: [3], "bad_column": ["anchor"], "reason": ["null"], "raw": ["{}"]})
    table = R.InputTable("i0-t", "nli_triplets", rows, bad)
    shards = R.plan_shards([table], ["de"], 10)
    assert [s.name for s in shards] == ["i0-t-de-0000000-0000004"]
    sentences = R.unique_sentences([table], shards)
    assert sentences.height == 8  # "P" once
    copy = {"code": "copy", "detail": "similarity to the source", "value": 0.95, "threshold": 0.9}
    kept, quarantine = R.assemble(table, shards[0], _fake_translations(sentences, {"e2": copy}), "snli")
    assert kept["row_id"].to_list() == [0, 2] and kept["anchor"].to_list() == ["DE P", "DE Q"]
    assert kept["source_anchor"].to_list() == ["P", "Q"] and set(kept["lang"]) == {"de"}
    assert quarantine["row_id"].to_list() == [1, 3]
    assert quarantine["reasons"].to_list()[0] == [{**copy, "column": "positive"}]
    assert quarantine.select(R.reason_codes())["reasons"].to_list() == [["copy"], ["malformed"]]
    assert quarantine["reason"].to_list()[0] == "positive: copy (similarity to the source 0.950 vs 0.9)"
    # the copied positive of row 1 is left out of the parallel data, its anchor and negative are in;
    # the malformed row 3 has no translation and gives nothing
    parallel = R.parallel_sentences(kept, quarantine, "nli_triplets")
    assert sorted(zip(parallel["row_id"].to_list(), parallel["column"].to_list())) == [
        (0, "anchor"), (0, "negative"), (0, "positive"), (1, "anchor"), (1, "negative"),
        (2, "anchor"), (2, "negative"), (2, "positive")]
    assert parallel["cosine"].null_count() == parallel.height  # no embedding checks ran
    summary = summarize(kept, quarantine, ["de"]).row(0, named=True)
    assert (summary["rows_in"], summary["kept"], summary["quarantined"], summary["malformed"]) == (4, 2, 2, 1)
    assert summary["pass_copy"] == pytest.approx(1 - 1 / 9)


def test_assemble_embedding_checks_margin_and_pair_consistency():
    """Scored pairs with fake embeddings: a wrong translation fails the margin, a broken relation the pair check."""
    n = 8
    common, topics = np.ones(2 * n + 1) / np.sqrt(2 * n + 1) * 2, np.eye(2 * n + 1)
    s1 = [f"A man number {i} plays." for i in range(n)]
    s2 = [f"A woman number {i} sings." for i in range(n)]
    emb = {}
    for i in range(n):  # sentence2 of row i: close to its sentence1 (the pair is similar) in the source and target
        emb[s1[i]] = (_unit(common + topics[i]), _unit(common + topics[i] * 0.9))
        pair = _unit(common + topics[i] + topics[n + i] * 0.5)
        emb[s2[i]] = (pair, _unit(common + (topics[i] + topics[n + i] * 0.5) * 0.9))
    emb[s1[0]] = (emb[s1[0]][0], _unit(common + topics[5] * 0.9))  # row 0: wrong meaning
    emb[s2[3]] = (emb[s2[3]][0], _unit(common + topics[2 * n] * 0.9))  # row 3: the relation is gone
    rows = pl.DataFrame({"sentence1": s1, "sentence2": s2, "score": [0.8] * n, "lang1": ["en"] * n,
                         "lang2": ["en"] * n}).with_row_index(R.ROW_ID).with_columns(pl.col(R.ROW_ID).cast(pl.Int64))
    bad = pl.DataFrame(schema={R.ROW_ID: pl.Int64, "bad_column": pl.String, "reason": pl.String, "raw": pl.String})
    table = R.InputTable("i0-p", "scored_pairs", rows, bad)
    shard = R.plan_shards([table], ["de"], 100)[0]
    trans = _fake_translations(R.unique_sentences([table], [shard]), emb=emb)
    qe = QEConfig(min_cosine=0.5, min_margin=0.96, max_pair_delta=0.1, margin_min_pool=16)
    kept, quarantine = R.assemble(table, shard, trans, "stsb", qe)
    reasons = {r: {(f["code"], f["column"]) for f in fs} for r, fs in
               zip(quarantine["row_id"].to_list(), quarantine["reasons"].to_list(), strict=True)}
    assert ("margin", "sentence1") in reasons[0]
    assert ("pair_consistency", "row") in reasons[3]
    assert all(code != "margin" for code, _ in reasons[3])
    assert set(kept["row_id"]) | set(reasons) == set(range(n)) and not set(kept["row_id"]) & set(reasons)
    assert kept["margin_sentence1"].min() >= 0.96 and kept.height == n - 2
    assert "source_embedding" not in kept.columns and "translation_embedding" not in quarantine.columns
    # parallel sentences: every sentence of kept rows, and the passing sentences of quarantined ones
    # (row 0 keeps its sentence2; row 3 failed only the row-level pair check and keeps both)
    parallel = R.parallel_sentences(kept, quarantine, "scored_pairs")
    got = set(zip(parallel["row_id"].to_list(), parallel["column"].to_list()))
    assert got == {(r, c) for r in range(n) for c in ("sentence1", "sentence2")} - {(0, "sentence1")}
    assert parallel.columns == list(R.PARALLEL_COLUMNS)
    row3 = parallel.filter(pl.col("row_id") == 3).sort("column")
    assert row3["source_sentence"].to_list() == [s1[3], s2[3]] and row3["sentence"].to_list() == [
        "DE " + s1[3], "DE " + s2[3]]
    assert parallel["margin"].null_count() == 0 and parallel["target_lang"].unique().to_list() == ["de"]
    # too small a pool: no margin, the cosine floor and the pair check still run
    small = QEConfig(min_cosine=0.5, min_margin=0.96, max_pair_delta=0.1, margin_min_pool=17)
    kept2, quarantine2 = R.assemble(table, shard, trans, "stsb", small)
    assert kept2["margin_sentence1"].null_count() == kept2.height
    assert quarantine2["row_id"].to_list() == [0, 3]
    summary = summarize(kept, quarantine, ["de"]).row(0, named=True)
    assert summary["pass_pair_consistency"] == pytest.approx(1 - 2 / n)


# ------------------------------------------------------------------ real Ray Data + vLLM (SmolLM2: plumbing only)


def _e2e_config(input_uri: str, output: str, **kw) -> SynthesizeConfig:
    data = {
        "inputs": [{"source": input_uri, "kind": "scored_pairs"}],
        "target_langs": ["de"],
        "translation": {"model": "smollm2-135m-instruct", "prompt_style": "chat", "max_model_len": 256,
                        "batch_size": 16, "max_tokens_floor": 8, "max_tokens_factor": 1.5},
        "shard_rows": 8,
        "max_bad_fraction": 0.2,
        "output": output,
    }
    data.update(kw)
    return build_config(SynthesizeConfig, data)


@pytest.mark.vllm
@pytest.mark.s3
@pytest.mark.timeout(400)
def test_end_to_end_s3_quarantine_and_resume(ray_local, s3, tmp_path):
    """Input and output on S3; malformed rows quarantined; a killed shard is redone alone."""
    from workflows.synthesize.pipeline import load_synthesized, run_synthesize

    rows = _pairs(18) + _pairs(2)  # duplicates: translated once
    rows += [{"sentence1": " ", "sentence2": "x", "score": 0.2, "lang1": "en", "lang2": "en"},
             {"sentence1": "y", "sentence2": None, "score": 0.2, "lang1": "en", "lang2": "en"}]
    local = _jsonl(tmp_path / "in.jsonl", rows)
    input_uri = s3.uri("synth-in", "pairs.jsonl")
    storage.write_bytes(input_uri, Path(local).read_bytes())
    output = s3.uri("synth-out", "run1")
    config = _e2e_config(input_uri, output)

    first = run_synthesize(config)
    manifest = storage.read_manifest(output)
    counts = manifest["counts"]["de"]
    assert counts["rows_in"] == 22 and counts["kept"] + counts["quarantined"] == 22
    assert counts["malformed"] == 2
    assert manifest["unique_sentences_translated"] == 36
    assert len(first["shards_written"]) == 3 == len(manifest["shards"])
    data = pl.from_arrow(storage.read_output(output, "data"))
    quarantine = pl.from_arrow(storage.read_output(output, "quarantine"))
    assert data.height + quarantine.height == 22
    # parallel sentences: both of every kept row, some of the quarantined ones, never a malformed row's
    parallel = pl.from_arrow(storage.read_output(output, "parallel"))
    assert parallel.height == counts["parallel_sentences"] >= 2 * data.height
    assert set(parallel["row_id"]) <= set(data["row_id"]) | set(quarantine.filter(~R.has_code(Q.MALFORMED))["row_id"])
    # structured reasons: every quarantined row has at least one failure with a known code and column
    assert quarantine.filter(R.has_code(Q.MALFORMED)).height == 2
    failures = quarantine.select(pl.col("reasons").explode()).unnest("reasons")
    assert quarantine["reasons"].list.len().min() >= 1
    assert set(failures["code"]) <= set(Q.REASONS)
    assert set(failures["column"]) <= {"sentence1", "sentence2", Q.ROW}
    assert manifest["quarantine_codes"]["de"][Q.MALFORMED] == 2
    assert sum(manifest["quarantine_codes"]["de"].values()) >= counts["quarantined"]
    assert storage.exists(manifest["report"]["plot"]) and storage.exists(manifest["report"]["summary"])
    if data.height:
        assert load_synthesized(output, "scored_pairs").columns[:5] == ["sentence1", "sentence2", "score", "lang1",
                                                                       "lang2"]

    # simulate a kill during the last shard: its marker and the manifest are gone
    victim = sorted(manifest["shards"])[1]
    storage.delete(storage.join(output, "_shards", f"{victim}.json"))
    storage.delete(storage.manifest_uri(output))
    with pytest.raises(storage.StorageError):
        storage.read_manifest(output)
    second = run_synthesize(config)
    assert second["shards_written"] == [victim]
    again = pl.from_arrow(storage.read_output(output, "data"))
    again_q = pl.from_arrow(storage.read_output(output, "quarantine"))
    assert again.height + again_q.height == 22
    assert pl.concat([again.select("row_id"), again_q.select("row_id")])["row_id"].n_unique() == 22
    assert storage.read_manifest(output)["counts"] == manifest["counts"]

    # a committed output is not redone; another config may not write into it
    assert run_synthesize(config)["shards_written"] == []
    with pytest.raises(ConfigError, match="another config"):
        run_synthesize(_e2e_config(input_uri, output, shard_rows=4))


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_ray_data_llm_backend(ray_local, tmp_path):
    """The ray.data.llm processor backend produces the same columns and counts."""
    from workflows.synthesize.pipeline import run_synthesize

    uri = _jsonl(tmp_path / "in.jsonl", _pairs(6))
    config = _e2e_config(uri, str(tmp_path / "out"), translation={
        "model": "smollm2-135m-instruct", "prompt_style": "chat", "max_model_len": 256, "batch_size": 16,
        "backend": "ray_data_llm"}, qe={"cosine": False})
    result = run_synthesize(config)
    counts = result["manifest"]["counts"]["de"]
    assert counts["rows_in"] == 6 == counts["kept"] + counts["quarantined"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_killed_run_keeps_committed_shards_and_rerun_translates_only_the_rest(ray_local, tmp_path):
    """A synthesize process killed (SIGKILL) after its first shard commit keeps that shard; the rerun
    translates the other shards' sentences only, and every row ends up kept or quarantined once."""
    import os
    import subprocess
    import sys
    import time

    import yaml

    from workflows.synthesize.pipeline import run_synthesize

    n_shards, shard_rows = 6, 8
    uri = _jsonl(tmp_path / "in.jsonl", _pairs(n_shards * shard_rows))  # every sentence distinct
    output = tmp_path / "out"
    config = _e2e_config(uri, str(output), translation={
        "model": "smollm2-135m-instruct", "prompt_style": "chat", "max_model_len": 256, "batch_size": 8,
        "max_tokens_floor": 8, "max_tokens_factor": 1.5}, max_bad_fraction=0.0)
    cfg_file = tmp_path / "synthesize.yaml"
    cfg_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    markers = output / "_shards"
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.synthesize", "--config", str(cfg_file)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            while not (markers.is_dir() and any(markers.glob("*.json"))):
                assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no shard committed in 400 s"
                time.sleep(0.05)
            proc.kill()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    done_at_kill = {p.stem for p in markers.glob("*.json")}
    assert 1 <= len(done_at_kill) < n_shards, "the run was not killed halfway"
    assert not storage.is_committed(str(output))

    result = run_synthesize(config)
    manifest = result["manifest"]
    assert set(result["shards_written"]).isdisjoint(done_at_kill)
    assert set(result["shards_written"]) | done_at_kill == set(manifest["shards"]) and len(manifest["shards"]) == 6
    # no row translated twice: the rerun translated exactly the sentences of the shards it wrote
    assert manifest["unique_sentences_translated"] == 2 * shard_rows * len(result["shards_written"])
    counts = manifest["counts"]["de"]
    assert counts["rows_in"] == n_shards * shard_rows == counts["kept"] + counts["quarantined"]
    data = pl.from_arrow(storage.read_output(str(output), "data"))
    quarantine = pl.from_arrow(storage.read_output(str(output), "quarantine"))
    ids = pl.concat([data.select("row_id"), quarantine.select("row_id")])["row_id"]
    assert ids.len() == ids.n_unique() == n_shards * shard_rows
