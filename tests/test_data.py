"""Offline dataset loaders: row counts from data/README.md, value ranges, splits, the URI loader
with its quarantine, and spec validation. No Ray, no models."""

from __future__ import annotations

import importlib.util
import json
import shutil

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from embedforge import schemas as S
from embedforge import storage
from embedforge.config import build_config
from embedforge.data import (
    DATA_ENV, DatasetSpec, RetrievalData, data_root, detokenize, final_answer, forbid_test_split, is_test_split,
    load_dataset, load_table, relevant_docs, tatoeba_code, xquad_test_articles,
)
from embedforge.data.nli import XNLI_LANGS, snli_pairs, xnli_pairs
from embedforge.data.qa import XQUAD_LANGS, _xquad_json
from embedforge.data.sts import STSB_MULTI_MT_LANGS
from embedforge.errors import ConfigError, InputError, StorageError

pytestmark = pytest.mark.timeout(60)

TEXT_COLUMNS = {S.SENTENCE1, S.SENTENCE2, S.ANCHOR, S.POSITIVE, S.NEGATIVE, S.SRC, S.TGT, S.QUESTION,
                S.CONTEXT, S.ANSWER, S.TEXT, S.FINAL, S.LANG, S.LANG1, S.LANG2, S.SRC_LANG, S.TGT_LANG}


def load(**kw):
    return load_dataset(DatasetSpec(**kw))


def assert_clean(df: pl.DataFrame) -> None:
    """No null or blank text; scores (if any) are float32 in [0, 1]."""
    assert df.height > 0
    for col in TEXT_COLUMNS & set(df.columns):
        blank = df.filter(pl.col(col).is_null() | (pl.col(col).str.strip_chars() == ""))
        assert blank.height == 0, f"{col}: {blank.height} blank values, e.g. {blank.row(0)}"
    if S.SCORE in df.columns:
        assert df.schema[S.SCORE] == pl.Float32
        assert df[S.SCORE].min() >= 0.0 and df[S.SCORE].max() <= 1.0


# ---------------------------------------------------------------- row counts (data/README.md)

STS_COUNTS = {"train": 5749, "dev": 1500, "test": 1379}


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_stsb_every_line_parses(split):
    df = load(source="stsb", split=split)
    assert df.height == STS_COUNTS[split]
    assert df.columns == S.SCORED_PAIRS.names
    assert_clean(df)
    assert df[S.SCORE].max() == 1.0 and df[S.SCORE].min() == 0.0


def test_stsb_multi_mt_all_languages_and_splits():
    for lang in STSB_MULTI_MT_LANGS:
        for split, n in STS_COUNTS.items():
            df = load(source="stsb_multi_mt", split=split, lang=lang)
            assert df.height == n, (lang, split)
            assert_clean(df)
            assert set(df[S.LANG1]) == set(df[S.LANG2]) == {lang}


def test_stsb_crosslingual_rows_are_aligned():
    en = load(source="stsb_multi_mt", split="dev", lang="en")
    de = load(source="stsb_multi_mt", split="dev", lang="de")
    cross = load(source="stsb_crosslingual", split="dev", lang2="de")
    assert cross[S.SENTENCE1].to_list() == en[S.SENTENCE1].to_list()
    assert cross[S.SENTENCE2].to_list() == de[S.SENTENCE2].to_list()
    assert cross[S.SCORE].to_list() == en[S.SCORE].to_list() == de[S.SCORE].to_list()
    assert set(cross[S.LANG1]) == {"en"} and set(cross[S.LANG2]) == {"de"}
    # the English file is the STS-B benchmark itself: same gold scores row by row
    assert cross[S.SCORE].to_list() == load(source="stsb", split="dev")[S.SCORE].to_list()


def test_stsb_crosslingual_detects_misalignment(tmp_path, monkeypatch):
    src = data_root() / "stsb_multi_mt"
    (tmp_path / "stsb_multi_mt").mkdir()
    shutil.copy(src / "stsb-en-dev.csv", tmp_path / "stsb_multi_mt" / "stsb-en-dev.csv")
    lines = (src / "stsb-de-dev.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "stsb_multi_mt" / "stsb-de-dev.csv").write_text("".join(lines[1:]), encoding="utf-8")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(InputError, match="not row-aligned"):
        load(source="stsb_crosslingual", split="dev", lang2="de")
    (tmp_path / "stsb_multi_mt" / "stsb-de-dev.csv").write_text("".join(lines[1:] + lines[:1]), encoding="utf-8")
    with pytest.raises(InputError, match="row 1 has score"):
        load(source="stsb_crosslingual", split="dev", lang2="de")


def test_sick_relatedness_splits():
    all_ = load(source="sick", split="all")
    assert all_.height == 9840
    counts = dict(all_.group_by(S.SPLIT).len().iter_rows())
    assert counts == {"train": 4439, "dev": 495, "test": 4906}
    assert_clean(all_)
    # relatedness 1..5 -> (x - 1) / 4 spans the whole range
    assert all_[S.SCORE].min() == 0.0 and all_[S.SCORE].max() == 1.0


def test_nli_triplets_from_every_source():
    assert len(snli_pairs("dev")) == 9842 and len(snli_pairs("test")) == 9824
    for lang in XNLI_LANGS:
        assert len(xnli_pairs(lang, "dev")) == 2490 and len(xnli_pairs(lang, "test")) == 5010
    specs = [dict(source="snli", split="dev"), dict(source="xnli", split="dev", lang="de"),
             dict(source="xnli", split="test", lang="zh"), dict(source="xglue_nli", split="train"),
             dict(source="sick", split="train", kind="nli_triplets")]
    for spec in specs:
        df = load(**spec)
        assert df.columns == S.NLI_TRIPLETS.names
        assert_clean(df)
        assert (df[S.POSITIVE] != df[S.NEGATIVE]).all()
    # XNLI: every premise has exactly one entailed and one contradicted hypothesis
    assert load(source="xnli", split="dev", lang="de").height == 830


def test_triplet_pairing_is_deterministic():
    all_ = load(source="snli", split="dev")
    first = load(source="snli", split="dev", pairing="first")
    assert all_.height > first.height > 0
    assert first[S.ANCHOR].n_unique() == first.height  # one triplet per premise
    assert load(source="snli", split="dev").equals(all_)
    row = all_.row(0, named=True)  # first premise of s1.dev, detokenized
    assert row[S.ANCHOR] == "Two women are embracing while holding to go packages."
    assert row[S.POSITIVE] == "Two woman are holding packages."
    assert row[S.NEGATIVE] == "The men are fighting outside a deli."


def test_detokenize():
    assert detokenize("He does n't want hair to land on his neck . ") == "He doesn't want hair to land on his neck."
    assert detokenize("the words `` HELP ME '' on it .") == 'the words "HELP ME" on it.'
    assert detokenize("A man ( in red ) is 50 % done ; yes !") == "A man (in red) is 50% done; yes!"
    assert detokenize("It 's the dog 's toy , I 'm sure") == "It's the dog's toy, I'm sure"


def test_tatoeba_iso_codes():
    de = load(source="tatoeba", split="test", lang="de")
    assert de.equals(load(source="tatoeba", split="test", lang="deu"))
    assert de.height == 1000 and set(de[S.SRC_LANG]) == {"de"} and set(de[S.TGT_LANG]) == {"en"}
    assert de.row(0) == ("Maria sagte, sie wisse nicht, wo Tom sei.", "Mary said she didn't know where Tom was.",
                         "de", "en")
    assert_clean(de)
    assert tatoeba_code("zh") == "cmn"
    small = load(source="tatoeba", split="test", lang="tzl")  # no ISO 639-1 code: the 639-3 code is kept
    assert small.height == 104 and set(small[S.SRC_LANG]) == {"tzl"}
    with pytest.raises(InputError, match="tatoeba has no language 'xx'.*available ISO 639-3 codes: afr"):
        load(source="tatoeba", split="test", lang="xx")


def test_xquad_counts_and_parallel_structure():
    for lang in XQUAD_LANGS:
        articles = _xquad_json(lang)["data"]
        assert sum(len(a["paragraphs"]) for a in articles) == 240
        df = load(source="xquad", split="all", lang=lang)
        assert df.height == 1190 and df[S.QID].n_unique() == 1190
        assert_clean(df)


def test_xquad_article_split_is_disjoint_and_language_independent():
    en_train, en_test = load(source="xquad", split="train", lang="en"), load(source="xquad", split="test", lang="en")
    de_train, de_test = load(source="xquad", split="train", lang="de"), load(source="xquad", split="test", lang="de")
    assert not set(en_train[S.ARTICLE]) & set(en_test[S.ARTICLE])
    assert en_train.height + en_test.height == 1190
    assert en_test[S.QID].to_list() == de_test[S.QID].to_list()
    assert en_train[S.QID].to_list() == de_train[S.QID].to_list()
    assert set(de_test[S.ARTICLE]) == xquad_test_articles(0.5) and len(xquad_test_articles(0.5)) == 24
    assert len(xquad_test_articles(0.25)) == 12
    assert load(source="xquad", split="test", lang="en", test_fraction=0.25).height < en_test.height


def test_xquad_crosslingual_questions_against_english_contexts():
    cross = load(source="xquad", split="test", lang="de", lang2="en")
    en = load(source="xquad", split="test", lang="en")
    de = load(source="xquad", split="test", lang="de")
    assert cross[S.QUESTION].to_list() == de[S.QUESTION].to_list()
    assert cross[S.CONTEXT].to_list() == en[S.CONTEXT].to_list()
    assert cross[S.ANSWER].to_list() == en[S.ANSWER].to_list()
    assert set(cross[S.LANG]) == {"de"}


def test_cranfield():
    data = load(source="cranfield", split="test")
    assert isinstance(data, RetrievalData)
    assert data.queries.height == 225 and data.queries[S.QID].to_list() == [str(i) for i in range(1, 226)]
    assert data.corpus.height + data.bad.height == 1400
    assert data.bad.height == 2 and all("no title and no text" in r for r in data.bad[S.REASON])
    assert_clean(data.queries) and assert_clean(data.corpus)
    assert data.qrels.height == 1837 and data.qrels[S.QID].n_unique() == 225
    assert set(data.qrels[S.RELEVANCE].unique()) == {0.0, 1.0, 2.0, 3.0, 4.0}
    # the third query's .I number is 004 in the file; it is query 3 in cranqrel
    assert data.queries.row(2)[1].startswith("what problems of heat conduction in composite slabs")
    rel = relevant_docs(data.qrels)
    assert len(rel) == 225 and "184" in rel["1"] and "486" not in rel["1"]  # 486 is "-1: of no interest"
    small = load(source="cranfield", split="test", limit=5)
    assert small.queries.height == 5 and set(small.qrels[S.QID]) == {"1", "2", "3", "4", "5"}


def test_gsm8k():
    train, test = load(source="gsm8k", split="train"), load(source="gsm8k", split="test")
    assert train.height == 7473 and test.height == 1319
    assert train.columns == [S.QUESTION, S.ANSWER, S.FINAL]
    assert_clean(train)
    assert train.row(0)[2] == "72"
    assert train[S.FINAL].str.contains(",").sum() == 0
    assert final_answer("so 1,000 + 80\n#### 1,080") == "1080"
    with pytest.raises(InputError, match="no '####'"):
        final_answer("the answer is 3")


def test_limit_and_all():
    assert load(source="stsb", split="dev", limit=7).height == 7
    all_ = load(source="stsb", split="all")
    assert all_.height == 5749 + 1500 + 1379 and S.SPLIT in all_.columns


# ---------------------------------------------------------------- generic URI loader

def _pairs_rows():
    return [
        {"sentence1": "a", "sentence2": "b", "score": 0.5, "lang1": "en", "lang2": "en"},
        {"sentence1": "  ", "sentence2": "b", "score": 0.5, "lang1": "en", "lang2": "en"},      # 2: blank
        {"sentence1": "a", "sentence2": "b", "score": 1.5, "lang1": "en", "lang2": "en"},       # 3: range
        {"sentence1": "c", "sentence2": "d", "score": 1.0, "lang1": "en", "lang2": "de", "extra": 1},
        {"sentence1": "a", "sentence2": None, "score": 0.1, "lang1": "en", "lang2": "en"},      # 5: null
    ]


def test_load_table_jsonl_quarantines_bad_rows(tmp_path):
    rows = _pairs_rows()
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{not json")                                                               # line 3
    lines.append(json.dumps({"sentence1": "a", "sentence2": "b", "score": "high", "lang1": "en", "lang2": "en"}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = load_table(str(path), "scored_pairs")
    assert result.rows.columns == S.SCORED_PAIRS.names
    assert result.rows[S.SENTENCE1].to_list() == ["a", "c"]
    assert result.rows.schema[S.SCORE] == pl.Float32
    bad = {line: reason for line, reason, _ in result.bad.iter_rows()}
    assert sorted(bad) == [2, 3, 4, 6, 7]
    assert bad[2] == "sentence1: empty text"
    assert bad[3].startswith("invalid JSON")
    assert bad[4] == "score: 1.5 outside [0, 1]"
    assert bad[6] == "sentence2: null"
    assert bad[7] == "score: not numeric ('high')"
    assert json.loads(result.bad.filter(pl.col(S.LINE) == 4)[S.RAW][0])["score"] == 1.5


def test_load_table_parquet_and_missing_columns(tmp_path):
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "extra"} for r in _pairs_rows()])
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    result = load_table(f"file://{path}", "scored_pairs")
    assert result.rows.height == 2 and result.bad[S.LINE].to_list() == [2, 3, 5]
    pq.write_table(table.drop_columns(["score", "lang2"]), path)
    with pytest.raises(InputError, match=r"missing columns \['score', 'lang2'\]; received columns \['sentence1'"):
        load_table(str(path), "scored_pairs")
    with pytest.raises(InputError, match="name the file"):
        load_table(str(tmp_path / "pairs.csv"), "scored_pairs")
    with pytest.raises(StorageError, match="not found"):
        load_table(str(tmp_path / "absent.parquet"), "scored_pairs")


def test_load_dataset_uri_respects_max_bad_fraction(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _pairs_rows()))
    with pytest.raises(InputError, match="3 of 5 rows are bad.*first at line 2: sentence1: empty text"):
        load(source=str(path), kind="scored_pairs")
    assert load(source=str(path), kind="scored_pairs", max_bad_fraction=0.6).height == 2


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_load_table_from_s3(s3, tmp_path):
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(_pairs_rows()[:1] * 3), buf)
    uri = s3.uri("data", "pairs.parquet")
    storage.write_bytes(uri, buf.getvalue().to_pybytes())
    result = load_table(uri, "scored_pairs")
    assert result.rows.height == 3 and result.bad.height == 0


# ---------------------------------------------------------------- spec validation and the test guard

@pytest.mark.parametrize("kw, message", [
    (dict(source="wikitext"), "unknown source 'wikitext'; use one of stsb"),
    (dict(source="snli", split="train"), "source 'snli' has no split 'train'; allowed splits: dev, test, all"),
    (dict(source="tatoeba", split="test"), "source 'tatoeba' needs lang"),
    (dict(source="xnli", split="dev", lang="ja"), "has no lang 'ja'; available: ar, bg"),
    (dict(source="stsb", lang2="de"), "lang2 is only used by stsb_crosslingual, xquad"),
    (dict(source="stsb_crosslingual"), "needs lang2"),
    (dict(source="gsm8k", kind="qa"), "provides kind math_qa, not 'qa'"),
    (dict(source="s3://bucket/pairs.parquet"), "set kind to one of scored_pairs"),
    (dict(source="stsb", limit=0), "greater than 0"),
    (dict(source="stsb", colour="red"), "Extra inputs are not permitted"),
])
def test_spec_validation_messages(kw, message):
    with pytest.raises(ValidationError, match=message):
        DatasetSpec(**kw)


def test_spec_from_config_is_a_config_error():
    with pytest.raises(ConfigError, match="allowed splits: train, test, all"):
        build_config(DatasetSpec, {"source": "xquad", "split": "dev"})


def test_test_split_guard():
    assert is_test_split(DatasetSpec(source="stsb", split="test"))
    assert is_test_split(DatasetSpec(source="stsb", split="all"))
    assert is_test_split(DatasetSpec(source="tatoeba", split="test", lang="de"))
    assert not is_test_split(DatasetSpec(source="snli", split="dev"))
    assert not is_test_split(DatasetSpec(source="/x/pairs.jsonl", kind="scored_pairs"))
    forbid_test_split(DatasetSpec(source="stsb", split="train"), "training")
    with pytest.raises(ConfigError, match="test splits are for final evaluation only; use train or dev for "
                                          "threshold tuning"):
        forbid_test_split(DatasetSpec(source="xnli", split="test", lang="de"), "threshold tuning")


def test_data_root_errors(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(StorageError, match=f"{DATA_ENV}=.*nowhere.* is not a folder"):
        data_root()
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(InputError, match=r"dataset file .*stsbenchmark/sts-dev.csv' is missing; check EMBEDFORGE_DATA"):
        load(source="stsb", split="dev")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_source_without_datasets_package():
    spec = DatasetSpec(source="hf:sentence-transformers/stsb", kind="scored_pairs", split="dev")
    with pytest.raises(InputError, match="needs the Hugging Face `datasets` package: pip install datasets"):
        load_dataset(spec)


class FakeHubDataset:
    """Stands in for a `datasets.Dataset`: only `.data.table` (a pyarrow Table) is read."""

    def __init__(self, table: pa.Table):
        self.data = type("FakeArrowTable", (), {"table": table})()


def test_hub_source_maps_splits_and_fills_languages(monkeypatch):
    import types

    calls = []

    def load_dataset_fake(name, config, split):
        calls.append((name, config, split))
        return FakeHubDataset(pa.Table.from_pylist([
            {"sentence1": "a", "sentence2": "b", "score": 0.25},
            {"sentence1": "", "sentence2": "b", "score": 0.5},
        ]))

    monkeypatch.setitem(__import__("sys").modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset_fake))
    spec = DatasetSpec(source="hf:org/sts:de", kind="scored_pairs", split="dev", lang="de", max_bad_fraction=0.5)
    df = load_dataset(spec)
    assert calls == [("org/sts", "de", "validation")]
    assert df.rows(named=True) == [{"sentence1": "a", "sentence2": "b", "score": 0.25, "lang1": "de", "lang2": "de"}]
    with pytest.raises(InputError, match="1 of 2 rows are bad"):
        load_dataset(spec.model_copy(update={"max_bad_fraction": 0.0}))
