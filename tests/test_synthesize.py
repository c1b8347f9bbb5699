"""Synthesize stage: pure prompt/QE/row logic first, then the real Ray Data + vLLM pipeline on CPU.

The end-to-end tests use SmolLM2-135M-Instruct because it is small; it cannot translate, so
they check the plumbing (shards, quarantine, resume, S3, counts), not translation quality.
"""

from __future__ import annotations

import json
from pathlib import Path

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
from workflows.synthesize.stages import qe_batch

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


def _codes(translation, tokens=10, max_tokens=40, cosine=0.9, source=SRC, lang="de"):
    return [Q.reason_code(r) for r in Q.assess(source, translation, lang, tokens, max_tokens, QE, cosine)["reasons"]]


def test_qe_good_translation_passes():
    assert _codes(GOOD) == []


def test_qe_empty():
    assert _codes("   ") == [Q.EMPTY]


def test_qe_runaway_by_limit_and_by_repetition():
    assert Q.RUNAWAY in _codes(GOOD, tokens=40, max_tokens=40)
    looped = "Ein Mann spielt Gitarre und ein Mann spielt Gitarre und ein Mann spielt Gitarre"
    assert Q.check_runaway(looped, 10, 40, 3).startswith(Q.RUNAWAY)


def test_qe_copy():
    assert Q.COPY in _codes("A man is playing a guitar on the stage!")


def test_qe_length_ratio():
    assert _codes("Ein Mann spielt.") == [Q.LENGTH_RATIO]
    long = GOOD + " Er trägt einen blauen Hut und eine rote Jacke, und das Publikum klatscht laut."
    assert Q.LENGTH_RATIO in _codes(long)


def test_qe_language():
    assert _codes("Un homme joue de la guitare sur scène.") == [Q.LANGUAGE]


def test_qe_cosine():
    assert _codes(GOOD, cosine=0.5) == [Q.COSINE]
    assert Q.check_cosine(None, 0.8) is None


def test_qe_batch_stage_on_a_dict():
    out = qe_batch({"text": [SRC, SRC], "lang": ["de", "de"], "generated_text": [" " + GOOD + "\n", ""],
                    "num_generated_tokens": [10, 0], "max_tokens": [40, 40], "cosine": [0.9, 0.1]},
                   QE.model_dump())
    assert out["translation"] == [GOOD, ""]
    assert out["qe"][0] == "" and out["qe"][1].startswith("empty")
    with pytest.raises(Exception, match="missing columns"):
        qe_batch({"text": [SRC]}, QE.model_dump())


# ------------------------------------------------------------------ rows (pure)


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _pairs(n: int) -> list[dict]:
    return [{"sentence1": f"A man number {i} plays.", "sentence2": f"A woman number {i} sings.",
             "score": 0.5, "lang1": "en", "lang2": "en"} for i in range(n)]


def test_malformed_rows_go_to_bad_with_reasons(tmp_path):
    rows = _pairs(3) + [{"sentence1": "", "sentence2": "x", "score": 0.1, "lang1": "en", "lang2": "en"},
                        {"sentence1": None, "sentence2": "x", "score": 0.1, "lang1": "en", "lang2": "en"}]
    uri = _jsonl(tmp_path / "pairs.jsonl", rows)
    config = _config(inputs=[{"source": uri, "kind": "scored_pairs"}])
    table = R.load_input(0, config.inputs[0])
    assert table.rows.height == 3 and table.bad.height == 2 and table.num_rows == 5
    assert set(table.bad[R.ROW_ID]) == {3, 4}
    assert any("sentence1: empty" in r for r in table.bad["reason"]) and any("null" in r for r in table.bad["reason"])


def test_unique_sentences_and_assemble():
    rows = pl.DataFrame({"anchor": ["P", "P", "Q"], "positive": ["e1", "e2", "e3"], "negative": ["c1", "c2", "c3"],
                         "lang": ["en"] * 3}).with_row_index(R.ROW_ID).with_columns(pl.col(R.ROW_ID).cast(pl.Int64))
    bad = pl.DataFrame({R.ROW_ID: [3], "reason": ["anchor: null"], "raw": ["{}"]})
    table = R.InputTable("i0-t", "nli_triplets", rows, bad)
    shards = R.plan_shards([table], ["de"], 10)
    assert [s.name for s in shards] == ["i0-t-de-0000000-0000004"]
    sentences = R.unique_sentences([table], shards)
    assert sentences.height == 8  # "P" once
    trans = sentences.with_columns(
        pl.concat_str([pl.lit("DE "), pl.col("text")]).alias("translation"), pl.lit(0.9).alias("cosine"),
        pl.lit("de").alias("detected_lang"), pl.lit(0.99).alias("lang_prob"), pl.lit(1.0).alias("length_ratio"),
        pl.when(pl.col("text") == "e2").then(pl.lit("copy: x")).otherwise(pl.lit("")).alias("qe"))
    kept, quarantine = R.assemble(table, shards[0], trans, "snli")
    assert kept["row_id"].to_list() == [0, 2] and kept["anchor"].to_list() == ["DE P", "DE Q"]
    assert kept["source_anchor"].to_list() == ["P", "Q"] and set(kept["lang"]) == {"de"}
    assert quarantine["row_id"].to_list() == [1, 3]
    assert quarantine["reason"].to_list() == ["positive: copy: x", "malformed: anchor: null"]
    summary = summarize(kept, quarantine, ["de"]).row(0, named=True)
    assert (summary["rows_in"], summary["kept"], summary["quarantined"], summary["malformed"]) == (4, 2, 2, 1)
    assert summary["pass_copy"] == pytest.approx(1 - 1 / 9)


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
    assert quarantine.filter(pl.col("reason").str.starts_with("malformed")).height == 2
    rejected = quarantine.filter(~pl.col("reason").str.starts_with("malformed"))
    codes = {Q.reason_code(p.split(": ", 1)[1]) for r in rejected["reason"] for p in r.split("; ") if ": " in p}
    assert codes <= set(Q.REASONS)
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
